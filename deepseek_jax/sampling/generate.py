"""Generation: a jit-compiled prefill and decode loop over a preallocated KV cache.

  out = generate(variables, config, [[0, 17, 42], [0, 5]], max_new_tokens=32, temperature=0.7,
                 top_p=0.95, eos_id=config.eos_id, rng=jax.random.key(0))
  out.tokens [B, N]   out.logprobs [B, N]   out.lengths [B]        (N = max_new_tokens)

Prompts are right-padded: row b's prompt sits at positions 0 … len_b − 1 (exactly where the
trainer puts it), its k-th generated token at position len_b + k, and cache slot = position.
Every row therefore attends only to its own tokens (the mask is built from the per-row
positions), and a row's output equals generating that row alone, up to fp32 rounding in
batched matmuls. Prompts are given as a list of id lists, or as a padded int array [B, P] with
`prompt_lengths` [B] (default: every row full). The prompt width is rounded up to a multiple
of 8 to limit recompiles, and the cache holds that width plus N slots (plus one for
speculative decoding) unless `max_len` sets it (it must hold the longest prompt plus N).

One jitted program per (config, batch, prompt-width bucket, N, cache length and kind,
speculative or not) — temperature, top-k, top-p, EOS and pad ids are runtime values, so
changing them does not recompile — runs the prefill (one pass over the prompts with
`config.attention_impl`), then a `lax.while_loop` of decode steps (absorbed MLA over the latent
cache) that ends as soon as every row has stopped. A row stops at `eos_id` (kept in its output,
counted in its length) or after N tokens (or its own budget, `row_max_new_tokens`); finished
rows are padded with `pad_id` and get log-prob 0.

Log-probs: `logprobs[b, k]` = log_softmax(logits / T)[tokens[b, k]] in fp32, T = 1 when
greedy, where logits are the fp32 logits `Transformer.decode` returns at position len_b − 1 + k
(the same final norm and head as `Transformer.apply`). For seq = prompt_b + generated_b laid out
from position 0 (as here), that is log_softmax(Transformer.apply(variables, seq)[0] / T)[b,
len_b − 1 + k, tokens[b, k]] — what a trainer computes — up to fp32 rounding (the cached,
absorbed path sums in a different order: ~1e-6; the tests allow 1e-4). top-k / top-p change
which tokens can be drawn, never the reported log-prob: it is under the untruncated tempered
distribution (see `sample.py`).

Randomness: `rng` is one key (row b uses fold_in(rng, b): its samples depend on its index in
the batch, not on the other rows) or one key per row [B] (then a row's samples depend only on
its own key, whatever batch it is in). Token k of a row uses fold_in(row key, k), so runs
reproduce exactly for the same inputs, shapes and settings.

Speculative decoding (`speculative=True`, `speculative.py`) needs `config.mtp_depth > 0`;
it changes how many model passes run, not what is produced: greedy output is the same token
for token, sampled output has the same distribution (different draws).

Sharding: pass `mesh` and `rules` (from `deepseek_jax.parallel`, e.g. `mesh_and_rules("fsdp")`);
the variables are placed with the training shardings, prompts and the cache split their batch
over the batch axes, and the run traces inside `sharding_context`.

Groups of samples per prompt (GRPO), with each prompt prefilled once and continuous batching,
are `batching.py`'s `generate_groups`.

Left out: streaming tokens out during the loop, prompt caching across calls, stop strings,
several EOS ids.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.processes import together
from deepseek_jax.sampling.cache import KINDS
from deepseek_jax.sampling.loop import (Generation, Knobs, Settings, fold_keys, pick, prefill,
                                        step_models)
from deepseek_jax.sampling.speculative import speculative_loop
from deepseek_jax.train import sharded

PROMPT_BUCKET = 8  # prompt widths are rounded up to a multiple of this (fewer recompiles)


# --- inputs ----------------------------------------------------------------------------------

def prepare_prompts(prompts, config: ModelConfig, prompt_lengths=None,
                    pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P] int32 right-padded with `pad_id`, lengths [B] int32), checked.

    Args:
      prompts: a list of id sequences, or a padded int array [B, P].
      config: for the vocabulary size.
      prompt_lengths: [B] real tokens per row of an array input (default: P for every row).
      pad_id: the id written after each prompt.

    Raises:
      ValueError: no prompts, an empty prompt, or an id outside [0, vocab_size).
    """
    if isinstance(prompts, (list, tuple)):
        if any(np.ndim(p) != 1 for p in prompts):
            raise ValueError("prompts given as a list must be a list of id sequences, e.g. "
                             "[[0, 17, 42], [0, 5]]")
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths goes with a padded [B, P] array, not a list of "
                             "prompts (a list carries its own lengths)")
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        lengths = np.array([len(r) for r in rows], np.int64)
        ids = np.full((len(rows), max(lengths, default=0)), pad_id, np.int64)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
    else:
        ids = np.asarray(prompts)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompts must be a list of id lists or an int array [B, P]; got "
                             f"an array of shape {ids.shape} and dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        lengths = (np.full(ids.shape[0], ids.shape[1], np.int64) if prompt_lengths is None
                   else np.asarray(prompt_lengths, np.int64).reshape(-1))
        if lengths.shape[0] != ids.shape[0]:
            raise ValueError(f"prompt_lengths has {lengths.shape[0]} entries for "
                             f"{ids.shape[0]} prompts")
        if np.any(lengths > ids.shape[1]):
            b = int(np.argmax(lengths > ids.shape[1]))
            raise ValueError(f"prompt_lengths[{b}] = {lengths[b]} exceeds the prompt width "
                             f"{ids.shape[1]}")
    if len(lengths) == 0:
        raise ValueError("no prompts given; pass at least one")
    if np.any(lengths < 1):
        b = int(np.argmin(lengths))
        raise ValueError(f"prompt {b} is empty; every row needs at least one token (e.g. the "
                         f"BOS id {config.bos_id})")
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]                  # [B, P]
    bad = real & ((ids < 0) | (ids >= config.vocab_size))
    if bad.any():
        b, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"prompt {b} has token id {ids[b, j]} at position {j}, outside the "
                         f"vocabulary [0, {config.vocab_size})")
    ids = np.where(real, ids, pad_id)
    return ids.astype(np.int32), lengths.astype(np.int32)


def row_keys(rng, batch: int) -> jax.Array:
    """One typed PRNG key per row [B] from one key (folded with the row index) or B keys."""
    rng = jnp.asarray(rng)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)                    # a raw uint32 key (PRNGKey)
    if rng.shape == ():
        return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch))
    if rng.shape != (batch,):
        raise ValueError(f"rng must be one key or one key per row ({batch}); got shape "
                         f"{rng.shape}")
    return rng


def row_limits(row_max_new_tokens, batch: int, max_new_tokens: int) -> np.ndarray:
    """Per-row token budgets [B] int32 (default N each), checked to lie in [1, N]."""
    if row_max_new_tokens is None:
        return np.full(batch, max_new_tokens, np.int32)
    limits = np.asarray(row_max_new_tokens).reshape(-1)
    if limits.shape[0] != batch or not np.issubdtype(limits.dtype, np.integer):
        raise ValueError(f"row_max_new_tokens must be {batch} ints, one per row; got "
                         f"{limits.shape[0]} of dtype {limits.dtype}")
    if np.any((limits < 1) | (limits > max_new_tokens)):
        b = int(np.argmax((limits < 1) | (limits > max_new_tokens)))
        raise ValueError(f"row_max_new_tokens[{b}] = {limits[b]} must lie in [1, "
                         f"max_new_tokens={max_new_tokens}]")
    return limits.astype(np.int32)


def check_settings(config, lengths, width, max_new_tokens, temperature, top_k, top_p, eos_id,
                   rng, speculative, max_len, cache_kind) -> int:
    """Raises ValueError for settings that cannot run; returns the cache length S."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if temperature > 0 and rng is None:
        raise ValueError(f"temperature={temperature} samples; pass rng=jax.random.key(seed)")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k={top_k} must lie in [1, vocab_size={config.vocab_size}]")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {config.vocab_size})")
    if speculative and not config.mtp_depth:
        raise ValueError("speculative=True drafts with the MTP module, but this config has "
                         "mtp_depth=0; use speculative=False")
    if cache_kind not in KINDS:
        raise ValueError(f"cache_kind={cache_kind!r}: use one of {KINDS}")
    longest = int(lengths.max())
    need = longest + max_new_tokens + int(speculative)
    if longest + max_new_tokens > config.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens="
                         f"{max_new_tokens} exceeds config.max_seq_len={config.max_seq_len} "
                         "(the model's positions); shorten the prompt or lower max_new_tokens")
    if max_len is not None and need > max_len:
        extra = " + 1 slot for speculative verification" if speculative else ""
        raise ValueError(f"the cache is too short: max_len={max_len} slots, but the longest "
                         f"prompt ({longest} tokens) + max_new_tokens={max_new_tokens}{extra} "
                         f"needs {need}; raise max_len or shorten the prompt")
    return width + max_new_tokens + int(speculative) if max_len is None else max_len


# --- the compiled loops -------------------------------------------------------------------------

def _plain_loop(variables, ids, lengths, keys, limits, knobs: Knobs, eos_id, pad_id, *,
                config: ModelConfig, s: Settings) -> Generation:
    """Prefill, then one token per row per step."""
    logits, _, cache = prefill(variables, ids, lengths, config=config, s=s)    # [B, V]
    return plain_decode(variables, cache, logits, lengths, keys, limits, knobs, eos_id, pad_id,
                        config=config, s=s)


def plain_decode(variables, cache, logits, lengths, keys, limits, knobs: Knobs, eos_id, pad_id,
                 *, config: ModelConfig, s: Settings) -> Generation:
    """The decode loop after a prefill: `cache` holds row b's prompt (lengths [B]) and `logits`
    [B, V] are its last prompt token's; row b stops at EOS or after limits[b] ≤ N tokens."""
    B, N = lengths.shape[0], s.max_new_tokens
    _, step_model = step_models(config, s.cache_kind)
    tok, lp = pick(logits, fold_keys(keys, 0), knobs)                           # [B]
    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok)                # [B, N]
    logprobs = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp)                  # [B, N]
    count = jnp.ones((B,), jnp.int32)
    done = (tok == eos_id) | (count >= limits)

    def cond(state):
        step, *_, done = state
        return (step < N) & ~jnp.all(done)

    def body(state):
        step, cache, tok, pos, out, logprobs, count, done = state
        logits, _, cache = step_model.apply(variables, tok[:, None], pos[:, None], cache,
                                            method="decode")                    # [B, 1, V]
        new, lp = pick(logits[:, 0], fold_keys(keys, step), knobs)              # [B]
        live = ~done
        out = out.at[:, step].set(jnp.where(live, new, pad_id))
        logprobs = logprobs.at[:, step].set(jnp.where(live, lp, 0.0))
        count = count + live
        done = done | (live & (new == eos_id)) | (count >= limits)
        return step + 1, cache, new, pos + 1, out, logprobs, count, done

    state = (jnp.int32(1), cache, tok, lengths, out, logprobs, count, done)
    step, _, _, _, out, logprobs, count, _ = jax.lax.while_loop(cond, body, state)
    zeros = jnp.zeros((B,), jnp.int32)
    return Generation(out, logprobs, count, lengths, step - 1, zeros, zeros)


@functools.lru_cache(maxsize=32)
def compiled(config: ModelConfig, s: Settings):
    """The jitted run for these static settings (cached, so repeated calls do not retrace)."""
    fn = speculative_loop if s.speculative else _plain_loop
    return together(jax.jit(functools.partial(fn, config=config, s=s)), "generate")


# --- the entry point ----------------------------------------------------------------------------

def generate(variables: dict, config: ModelConfig, prompts, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, rng=None, speculative: bool = False,
             prompt_lengths: Sequence[int] | None = None, max_len: int | None = None,
             pad_id: int = 0, cache_kind: str = "latent", row_max_new_tokens=None, mesh=None,
             rules=None) -> Generation:
    """Generates up to `max_new_tokens` tokens for each prompt (see the module docstring).

    Args:
      variables: the model's variables ({"params", "routing"?}; boxed or plain).
      config: the model.
      prompts: a list of id lists, or an int array [B, P] (right-padded) with `prompt_lengths`.
      max_new_tokens: N, tokens to generate per row at most.
      temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
      top_k, top_p: restrict sampling to the top-k tokens, then to the smallest set of mass
        ≥ top_p; they do not change the reported log-probs (see `sample.py`).
      eos_id: a row stops after producing this id (None: rows run to N tokens).
      rng: a key, or one key per row [B]; required when temperature > 0.
      speculative: draft one token per step with MTP depth 1 and verify it with the main model.
      prompt_lengths: [B] real tokens per row of an array `prompts`.
      max_len: cache slots per row (default: just enough).
      pad_id: id written after each row's end in `tokens` (any int; the model never sees it:
        prompts are padded with id 0 inside).
      cache_kind: "latent" (MLA, the default) or "expanded" (per-head k/v, the baseline).
      row_max_new_tokens: [B] per-row budgets in [1, N] (default N each): row b stops after
        that many tokens, as if an EOS came there (a runtime value: no recompile).
      mesh, rules: run sharded (both or neither; see `deepseek_jax.parallel`).

    Returns:
      a `Generation` (tokens, logprobs, lengths, prompt_lengths, steps, drafted, accepted).

    Raises:
      ValueError: (before compiling) for empty prompts, ids outside the vocabulary, a cache
        too short for the prompt plus N, or settings that cannot run.
    """
    ids, lengths = prepare_prompts(prompts, config, prompt_lengths)  # padded with id 0
    width = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
    S = check_settings(config, lengths, width, max_new_tokens, temperature, top_k, top_p, eos_id,
                       rng, speculative, max_len, cache_kind)
    width = min(width, S)
    ids = np.pad(ids[:, :width], ((0, 0), (0, max(width - ids.shape[1], 0))),
                 constant_values=0)                                            # [B, width]
    keys = row_keys(jax.random.key(0) if rng is None else rng, ids.shape[0])
    s = Settings(max_new_tokens=max_new_tokens, speculative=speculative, cache_len=S,
                 cache_kind=cache_kind)
    knobs = Knobs(jnp.float32(temperature), jnp.int32(top_k or 0),
                  jnp.float32(1.0 if top_p is None else top_p))
    variables = flax.core.meta.unbox(variables)
    limits = row_limits(row_max_new_tokens, ids.shape[0], max_new_tokens)
    args = [variables, jnp.asarray(ids), jnp.asarray(lengths), keys, jnp.asarray(limits), knobs,
            jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id)]
    run = compiled(config, s)
    if mesh is None and rules is None:
        return run(*args)
    if mesh is None or rules is None:
        raise ValueError("pass both mesh and rules (e.g. deepseek_jax.parallel.mesh_and_rules)")
    return _run_sharded(run, args, config, mesh, rules)


def place_variables(variables: dict, config: ModelConfig, mesh, rules) -> dict:
    """The variables placed with the training shardings (multi-process too)."""
    from deepseek_jax import parallel

    shardings = sharded.param_shardings(config, mesh, rules)
    place = lambda tree, s: jax.tree.map(parallel.to_global, tree, s)
    return {k: place(v, shardings[k]) if k in shardings else v for k, v in variables.items()}


def _run_sharded(run, args, config: ModelConfig, mesh, rules) -> Generation:
    """Places variables with the training shardings and the batch over the batch axes."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from deepseek_jax import parallel

    variables, ids, lengths, keys, limits, *rest = args
    sharded.validate(config, mesh, rules, global_batch=ids.shape[0])
    variables = place_variables(variables, config, mesh, rules)
    rows = NamedSharding(mesh, P(parallel.batch_axes(rules) or None))
    ids = parallel.to_global(ids, parallel.batch_sharding(mesh, rules))
    lengths, keys, limits = (parallel.to_global(a, rows) for a in (lengths, keys, limits))
    with parallel.sharding_context(mesh, rules):
        return run(variables, ids, lengths, keys, limits, *rest)
