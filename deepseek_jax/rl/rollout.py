"""Rollouts for GRPO: prompts in, scored completions and a training batch out.

  prompts  → `sample` (G completions per prompt; the prompts come each repeated G times in a
             row, as `problems.for_step` lays them out, and so do the completions)
           → text → rewards (rewards.py) → advantages (advantages.py)
           → rows [prompt | completion | padding] with the target-aligned completion mask

`sample` runs the run config's `rl.rollout` path (ROLLOUTS):
  "continuous"  `sampling.generate_groups`: each distinct prompt prefilled once, then
                `rl.rollout_slots` rows decoded at a time, a finished row's slot refilled with
                the next pending completion (the default);
  "static"      `generate_groups` on the static schedule: shared prefill, all P·G rows decoded
                together until the longest ends; the one that takes `rl.speculative` (MTP
                draft-and-verify: same greedy tokens, same sampling distribution);
  "repeated"    `sampling.generate` on the repeated prompts (the prompt prefilled G times):
                the path before shared prefill, kept as the reference.
All three use the same key per completion (`sampling.group_keys` of the step's key), so for the
same policy and key they give the same completions (speculative sampling draws differently);
the sampler's log-probs differ by fp32 rounding only.

The row layout and mask are the ones `rl.step.grpo_step` documents: position i scores token i+1,
so mask[i] = 1 exactly when token i+1 is a completion token (the EOS that ended it included).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.data import tokenizer
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.data import r1
from deepseek_jax.rl import advantages, rewards
from deepseek_jax.sampling import Generation, generate, generate_groups, group_keys
from deepseek_jax.sampling.batching import batch_shards

BYTES = Encoder(None, add_bos=True)     # the default: byte tokenizer, prompts start with BOS
ROLLOUTS = ("continuous", "static", "repeated")


def check_rollout(rl, model_config: ModelConfig, mesh=None, rules=None) -> None:
    """Errors that name the field and the fix for the run config's rollout settings (before
    anything compiles), on the run's mesh."""
    rows = rl.prompts_per_step * rl.group_size
    shards = batch_shards(mesh, rules)
    if rl.rollout not in ROLLOUTS:
        raise ValueError(f"rl.rollout={rl.rollout!r}: use one of {ROLLOUTS}")
    if rl.speculative and not model_config.mtp_depth:
        raise ValueError("rl.speculative=True drafts with the MTP module, but the model has "
                         "mtp_depth=0; set rl.speculative=False")
    if rl.speculative and rl.rollout == "continuous":
        raise ValueError("rl.speculative=True runs on the static schedule: set "
                         "rl.rollout='static' (continuous batching has no speculative rounds)")
    slots = rollout_slots(rl, shards)
    if rl.rollout == "continuous" and not (1 <= slots <= rows and slots % shards == 0):
        raise ValueError(f"rl.rollout_slots={rl.rollout_slots} must lie in [1, prompts_per_step"
                         f" × group_size = {rows}] and divide by the mesh's {shards} batch "
                         "shards (0 = half the rows)")


def rollout_slots(rl, shards: int = 1) -> int:
    """`rl.rollout_slots`, where 0 (the default) means half of the P·G rows, rounded down to a
    multiple of the mesh's batch shards (at least one per shard)."""
    if rl.rollout_slots:
        return int(rl.rollout_slots)
    rows = rl.prompts_per_step * rl.group_size
    return max(shards, rows // 2 // shards * shards)


def distinct_prompts(prompts: Sequence[list[int]], group_size: int) -> list[list[int]]:
    """The P distinct prompts of P·G prompts laid out each repeated G times in a row."""
    if len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} prompts are not groups of group_size={group_size}")
    distinct = list(prompts[::group_size])
    for i, p in enumerate(prompts):
        if list(p) != list(distinct[i // group_size]):
            raise ValueError(f"prompt {i} differs from prompt {i - i % group_size}: rollouts "
                             f"need each prompt repeated group_size={group_size} times in a row")
    return distinct


def sample(variables: dict, model_config: ModelConfig, prompts: Sequence[list[int]], rl, *,
           eos_id: int, rng, mesh=None, rules=None) -> Generation:
    """G completions per prompt by the run config's `rl` section (rollout, rollout_slots,
    speculative, group_size, max_new_tokens, temperature); `prompts` and the result's rows are
    P·G, each prompt repeated G times in a row."""
    distinct = distinct_prompts(prompts, rl.group_size)
    kw = dict(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, eos_id=eos_id,
              speculative=rl.speculative, mesh=mesh, rules=rules)
    if rl.rollout == "repeated":
        return generate(variables, model_config, list(prompts),
                        rng=group_keys(rng, len(distinct), rl.group_size), **kw)
    return generate_groups(variables, model_config, distinct, rl.group_size, rng=rng,
                           schedule=rl.rollout,
                           slots=rollout_slots(rl, batch_shards(mesh, rules)), **kw)


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
