"""Rollouts for GRPO: prompts in, scored completions and a training batch out.

  prompts  → `sampling.generate` (G completions per prompt, each prompt repeated G times in a row)
           → text → rewards (rewards.py) → advantages (advantages.py)
           → rows [prompt | completion | padding] with the target-aligned completion mask

The row layout and mask are the ones `rl.step.grpo_step` documents: position i scores token i+1,
so mask[i] = 1 exactly when token i+1 is a completion token (the EOS that ended it included).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from deepseek_jax.data import tokenizer
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.data import r1
from deepseek_jax.rl import advantages, rewards

BYTES = Encoder(None, add_bos=True)     # the default: byte tokenizer, prompts start with BOS


def encode_prompts(problems: Sequence[dict[str, Any]], template: str,
                   encoder: Encoder = BYTES) -> list[list[int]]:
    """Template-wrapped prompts as ids (an HF model needs its own tokenizer.json's `Encoder`)."""
    return [encoder.encode_prompt(r1.make_prompt(p, template)) for p in problems]


def completion_ids(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Generated ids per row, cut at each row's length (EOS kept when present)."""
    return [list(map(int, tokens[i, : int(lengths[i])])) for i in range(tokens.shape[0])]


def score_completions(completions: Sequence[list[int]], problems: Sequence[dict[str, Any]],
                      format_weight: float, encoder: Encoder = BYTES, *,
                      template: str) -> dict[str, np.ndarray]:
    """{"total", "accuracy", "format"} arrays [B] and the decoded texts, for completions of
    `template` prompts (the format reward depends on whether the prompt opened <think>)."""
    texts = [encoder.decode(c) for c in completions]
    scored = [rewards.score(t, p, format_weight, template) for t, p in zip(texts, problems)]
    out = {k: np.asarray([s[k] for s in scored], np.float32) for k in ("total", "accuracy",
                                                                       "format")}
    out["texts"] = texts
    return out


def training_rows(prompts: Sequence[list[int]], completions: Sequence[list[int]], length: int,
                  sampler_logprobs: np.ndarray | None = None,
                  pad_id: int = tokenizer.PAD) -> dict[str, np.ndarray]:
    """Right-padded rows [B, length] of prompt + completion, the target-aligned mask, the
    token mask (1 on prompt and completion tokens, 0 on padding) and (if given) the sampler's
    log-probs placed at the same positions as the mask."""
    B = len(prompts)
    tokens = np.full((B, length), pad_id, np.int32)
    mask = np.zeros((B, length), np.float32)
    real = np.zeros((B, length), np.bool_)
    sampler = np.zeros((B, length), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) + len(c) > length:
            raise ValueError(f"row {i}: prompt {len(p)} + completion {len(c)} tokens exceed "
                             f"the training row of {length}; raise rl.max_new_tokens' budget")
        tokens[i, : len(p)] = p
        tokens[i, len(p): len(p) + len(c)] = c
        mask[i, len(p) - 1: len(p) + len(c) - 1] = 1.0       # positions whose next token is c
        real[i, : len(p) + len(c)] = True
        if sampler_logprobs is not None:
            sampler[i, len(p) - 1: len(p) + len(c) - 1] = sampler_logprobs[i, : len(c)]
    out = {"tokens": tokens, "mask": mask, "token_mask": real}
    if sampler_logprobs is not None:
        out["sampler_logp"] = sampler
    return out


def rollout_metrics(scores: dict[str, Any], completions: Sequence[list[int]],
                    lengths: np.ndarray, rows: dict[str, np.ndarray], old_logp: np.ndarray, *,
                    group_size: int, max_new_tokens: int, eos_id: int) -> dict[str, float]:
    """What a GRPO step logs about its rollouts: reward means and spreads (total, accuracy,
    format), the share of groups whose rewards are all equal (advantage 0: no signal), mean
    completion length, the share of completions cut at `max_new_tokens` without an EOS, and the
    largest gap between the sampler's and the trainer's log-prob of a sampled token (numerics:
    the two should agree to bf16/fp32 rounding)."""
    truncated = [lengths[i] == max_new_tokens and (not c or c[-1] != eos_id)
                 for i, c in enumerate(completions)]
    gap = np.abs(rows["sampler_logp"] - old_logp)[rows["mask"] > 0]
    out = {}
    for k, name in (("total", "reward"), ("accuracy", "accuracy_reward"),
                    ("format", "format_reward")):
        out[f"{name}_mean"] = float(scores[k].mean())
        out[f"{name}_std"] = float(scores[k].std())
    out["zero_variance_groups"] = float(advantages.zero_variance_fraction(scores["total"],
                                                                          group_size))
    out["completion_length"] = float(np.mean(lengths))
    out["truncation_rate"] = float(np.mean(truncated))
    out["sampler_trainer_logp_gap"] = float(gap.max()) if gap.size else 0.0
    return out
