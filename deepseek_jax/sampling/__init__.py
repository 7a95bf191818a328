"""Generation for the DeepSeek-V3 model: KV-cached decoding, the MLA latent cache, MTP speculative
decoding.

  from deepseek_jax.sampling import generate
  out = generate(variables, config, [[0, 17, 42], [0, 5]], max_new_tokens=32,
                 temperature=0.7, eos_id=config.eos_id, rng=jax.random.key(0))
  out.tokens [B, N]  out.logprobs [B, N]  out.lengths [B]

Files: `cache.py` (init_cache: latent and expanded caches, their sizes and logical axes),
`sample.py` (temperature, top-k, top-p, log-probs, the speculative acceptance rule),
`generate.py` (prompts, the prefill + decode loop, sharded runs), `speculative.py` (the MTP
draft-and-verify loop), `batching.py` (G samples per prompt: each prompt prefilled once, and
continuous batching over refilled slots: `generate_groups`). The model side — writing a step's latents at per-row positions and
attending over the cache — is `Transformer.decode` / `Transformer.draft`
(`deepseek_jax.model.transformer`, `blocks`, `mtp`).
"""

from deepseek_jax.sampling.cache import (cache_bytes, cache_bytes_per_token_per_layer, cache_kind,
                                         cache_logical_axes, init_cache)
from deepseek_jax.sampling.batching import generate_groups, group_keys
from deepseek_jax.sampling.generate import Generation, generate, prepare_prompts
from deepseek_jax.sampling.sample import (choose, residual_distribution, sampling_logits,
                                          sampling_probs, speculative_accept, token_logprobs)

__all__ = [
    "Generation", "cache_bytes", "cache_bytes_per_token_per_layer", "cache_kind",
    "cache_logical_axes", "choose", "generate", "generate_groups", "group_keys", "init_cache", "prepare_prompts",
    "residual_distribution", "sampling_logits", "sampling_probs", "speculative_accept",
    "token_logprobs",
]
