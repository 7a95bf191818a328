"""Direct preference optimization: the loss over preference pairs and one update as a pure
function, `dpo_step(state, batch) -> (state, metrics)`.

A batch holds B pairs (`data/preference.py`), the chosen side at index 0 and the rejected at 1:

  tokens      [B, 2, T]  prompt + response, right-padded
  mask        [B, 2, T]  1 where tokens[i+1] is a response token
  token_mask  [B, 2, T]  1 on real tokens (shapes the MoE statistics only)
  ref_logp    [B, 2]     the reference model's log π_ref(response | prompt), computed once
                         before training (`trainers/dpo.py`)

Both sides run through the model as one [2B, T] batch. With log-ratios r_w = log π(y_w|x) −
log π_ref(y_w|x) for the chosen side and r_l for the rejected, and h = r_w − r_l (the implicit
reward margin, divided by β), the per-pair loss `loss_type` is

  "sigmoid"  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)   DPO (Rafailov et al. 2023); ε =
             `label_smoothing` > 0 is conservative DPO, for labels flipped with probability ε
  "ipo"      (h − 1/(2β))²                           IPO (Azar et al. 2023, eq. 17, τ = β), on
             sequence log-probs as the paper writes it
  "hinge"    max(0, 1 − β·h)                         SLiC's calibration loss

plus `sft_weight`·(−log π(y_w|x) / |y_w|), the chosen response's mean token NLL (as in
iterative RPO, Pang et al. 2024), which keeps the chosen likelihood from falling while the
margin grows. The batch loss is the mean over its pairs; the sums run over the whole batch
array, so under a sharded jit they are global. Empty pairs (a padded evaluation batch, both
masks 0) weigh 0. Log-probs are at temperature 1. Logged beside "loss": "preference_loss" (the
term above alone), "nll_chosen", the implicit rewards β·r_w and β·r_l, and `reward_accuracy`,
the share of pairs with h > 0.

`microbatches` = k splits the pairs into k strided micro-batches, sums their gradients (each
micro-batch's loss sum over the whole batch's pair count) and applies one update, as the
pretraining step does. The routing bias moves by γ = `bias_update_rate` from the batch's
expert loads (0 freezes it). With LoRA adapters the step differentiates the adapters only.

Left out: a reference model updated during training (TR-DPO), and the online variants that
sample new pairs each step (use `rl.rejection` with keep="pairs" between runs instead).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import adapters
from deepseek_jax.model.routing import update_routing_bias
from deepseek_jax.rl.step import target_logprobs
from deepseek_jax.train.step import TrainState, routing_loads, split_microbatches

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    def check(self) -> "DPOSettings":
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type={self.loss_type!r}; use one of {LOSS_TYPES}")
        if not self.beta > 0:
            raise ValueError(f"dpo.beta={self.beta}: β must be positive (0.1 is the usual "
                             "start; smaller lets the policy move further from the reference)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing}: use a flip "
                             "probability in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("dpo.label_smoothing applies to loss_type='sigmoid' only")
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight={self.sft_weight}: use 0 or a positive weight")
        return self


def pair_logprobs(params, routing, batch: dict, config: ModelConfig):
    """(log π(response | prompt) [B, 2], moe_stats): each side's token log-probs summed over
    its response."""
    tokens = batch["tokens"]                                                    # [B, 2, T]
    B, _, T = tokens.shape
    flat = lambda x: x.reshape(2 * B, T)                                        # noqa: E731
    logp, _, stats = target_logprobs(params, routing, flat(tokens), config, 1.0,
                                     flat(batch["token_mask"]), entropy=False)  # [2B, T]
    return jnp.sum(logp * flat(batch["mask"]), -1).reshape(B, 2), stats


def pair_weight(mask) -> jax.Array:
    """[B]: 1 for a real pair (both responses have targets), 0 for an empty one."""
    n = jnp.sum(mask, -1)                                                       # [B, 2]
    return jnp.all(n > 0, -1).astype(jnp.float32)


def pair_terms(logp, ref_logp, mask, settings: DPOSettings) -> dict:
    """Per-pair loss and logged values, each [B], from log-probs [B, 2] (module docstring)."""
    s = settings
    ratio = logp - ref_logp                                                     # [B, 2]
    h = ratio[:, 0] - ratio[:, 1]                                               # [B]
    if s.loss_type == "sigmoid":
        loss = (-(1.0 - s.label_smoothing) * jax.nn.log_sigmoid(s.beta * h)
                - s.label_smoothing * jax.nn.log_sigmoid(-s.beta * h))
    elif s.loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * s.beta)) ** 2
    else:
        loss = jax.nn.relu(1.0 - s.beta * h)
    nll = -logp[:, 0] / jnp.maximum(jnp.sum(mask[:, 0], -1), 1.0)               # [B]
    total = loss + s.sft_weight * nll if s.sft_weight else loss
    return {"loss": total, "preference_loss": loss, "reward_chosen": s.beta * ratio[:, 0],
            "reward_rejected": s.beta * ratio[:, 1], "reward_margin": s.beta * h,
            "reward_accuracy": (h > 0).astype(jnp.float32), "logp_chosen": logp[:, 0],
            "logp_rejected": logp[:, 1], "nll_chosen": nll}


def weighted_sums(logp, ref_logp, mask, settings: DPOSettings) -> dict:
    """{name: Σ over real pairs of `pair_terms`}, with "pairs" their count."""
    w = pair_weight(mask)                                                       # [B]
    terms = pair_terms(logp, ref_logp, mask, settings)
    return {"pairs": jnp.sum(w), **{k: jnp.sum(w * v) for k, v in terms.items()}}


def pair_sums(params, routing, batch: dict, config: ModelConfig, settings: DPOSettings):
    """(`weighted_sums` of one (micro-)batch under `params`, moe_stats)."""
    logp, stats = pair_logprobs(params, routing, batch, config)
    return weighted_sums(logp, batch["ref_logp"], batch["mask"], settings), stats


def _sums_and_grads(trained, frozen, routing, batch, config, settings, microbatches: int):
    """(sums, moe_stats, gradient of Σ loss) over `microbatches` strided micro-batches; expert
    loads summed over them."""
    def fn(t, b):
        sums, stats = pair_sums(adapters.combine(t, frozen), routing, b, config, settings)
        return sums["loss"], (sums, stats)
    grad_fn = jax.value_and_grad(fn, has_aux=True)
    if microbatches == 1:
        (_, (sums, stats)), grads = grad_fn(trained, batch)
        return sums, stats, grads
    mbs = split_microbatches(batch, microbatches)
    first = jax.tree.map(lambda x: x[0], mbs)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                         jax.eval_shape(grad_fn, trained, first))

    def body(acc, mb):
        out = jax.tree.map(lambda x: x.astype(jnp.float32), grad_fn(trained, mb))
        return jax.tree.map(jnp.add, acc, out), None

    ((_, (sums, stats)), grads), _ = jax.lax.scan(body, zeros, mbs)   # loads: summed counts
    return sums, stats, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trained)


def dpo_step(state: TrainState, batch: dict, *, config: ModelConfig,
             tx: optax.GradientTransformation, settings: DPOSettings, microbatches: int = 1,
             bias_update_rate: float = 0.0):
    """One optimizer step on a batch of pairs; returns (new state, metrics): the pair means of
    `pair_terms`, "grad_norm" and "finite"."""
    trained, frozen = adapters.split(state.params, config)
    sums, stats, grads = _sums_and_grads(trained, frozen, state.routing, batch, config,
                                         settings, microbatches)
    n = jnp.maximum(sums.pop("pairs"), 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)                # of the mean loss over pairs
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    params = adapters.combine(optax.apply_updates(trained, updates), frozen)
    routing = state.routing
    if routing:
        routing = update_routing_bias(routing, routing_loads(stats, routing), bias_update_rate)
    metrics = {k: v / n for k, v in sums.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         routing=routing), metrics
