"""Held-out evaluation of a policy on task problems: greedy completions, scored.

accuracy = share of problems whose completion's answer is right; format = share of well-formed
completions. Greedy (temperature 0) decoding, so the number is a property of the weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import rollout


def evaluate(variables, config: ModelConfig, problems: Sequence[dict[str, Any]], template: str,
             *, max_new_tokens: int, batch_size: int, show: int = 0, mesh=None,
             rules=None, encoder: Encoder = rollout.BYTES) -> dict:
    """{"accuracy", "format", "length", "samples", "completions"} over `problems` (batched; the
    last batch is padded by repeating problems, whose scores are dropped). `samples` are the
    first `show` completions; `completions` all of them, in problem order."""
    from deepseek_jax.sampling import generate
    acc, fmt, lengths, texts = [], [], [], []
    for start in range(0, len(problems), batch_size):
        chunk = list(problems[start: start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)            # one compiled shape
        out = generate(variables, config, rollout.encode_prompts(chunk, template, encoder),
                       max_new_tokens=max_new_tokens, temperature=0.0, eos_id=encoder.eos_id,
                       mesh=mesh, rules=rules)
        tokens, out_lengths = parallel.to_host(out.tokens), parallel.to_host(out.lengths)
        completions = rollout.completion_ids(tokens, out_lengths)
        scores = rollout.score_completions(completions, chunk, format_weight=0.0,
                                           encoder=encoder, template=template)
        acc += list(scores["accuracy"][:n])
        fmt += list(scores["format"][:n])
        lengths += list(out_lengths[:n])
        texts += scores["texts"][:n]
    return {"accuracy": float(np.mean(acc)), "format": float(np.mean(fmt)),
            "length": float(np.mean(lengths)), "samples": texts[:show], "completions": texts}
