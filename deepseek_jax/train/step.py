"""The train step as one pure function: `train_step(state, batch) -> (state, metrics)`.

  1. forward with `mutable=["moe_stats"]` → final hidden states (main and MTP), the output
     head, per-layer expert loads and sequence-balance losses
  2. loss = LM + λ·MTP + α·balance (train/losses.py), the head applied `config.loss_chunk`
     positions at a time (no [B, T, V] logits); gradients w.r.t. params only (with LoRA
     adapters, `config.adapter_rank`, w.r.t. the adapters only: `model/adapters.py`)
  3. optimizer update (optax) of those parameters
  4. routing bias update b += γ·sign(mean_load − load) from the expert loads of this step. The
     loads are sums over the whole batch array, so under a sharded jit they are global counts
     over every data shard (XLA inserts the reduction), as V3 prescribes.

The state is a plain pytree (`TrainState`); the routing bias lives in `state.routing`, outside
`params`, so the optimizer never sees it and weight decay cannot touch it.

Gradient accumulation: `microbatches=k` splits the batch into k strided micro-batches, scans
over them summing fp32 gradients and expert loads, and applies one update. A batch with an
"active" row flag [B] (`train.schedules.assemble_microbatches`) may leave micro-batch slots
empty: those are skipped (`lax.cond`) and the means run over the filled ones, so a batch-size
ramp reuses one compiled step.

Settings (`settings=StepSettings(...)`, train.schedules): the MTP weight λ, the balance weight α
and the bias update speed γ belong to the run, not the model; λ and γ may be functions of the
step. The default is V3's constants.

Left out here: sharding (deepseek_jax.parallel wraps this function with in/out shardings) and
fp8 (a model config switch).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import adapters, moe, zigzag
from deepseek_jax.model.routing import update_routing_bias
from deepseek_jax.model.transformer import Transformer, init_variables
from deepseek_jax.train import losses
from deepseek_jax.train.schedules import StepSettings


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or inf (raised by the entrypoints)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    routing: Any          # {"...": bias [L, E]} per MoE stack; {} without routing bias


def init_train_state(rng: jax.Array, config: ModelConfig, tx: optax.GradientTransformation,
                     batch: int = 1, length: int = 8) -> TrainState:
    variables = flax.core.meta.unbox(init_variables(rng, config, batch, length))
    params = variables["params"]
    trained, _ = adapters.split(params, config)          # all of them, or the LoRA adapters
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trained),
                      routing=variables.get("routing", {}))


def _load_stats(moe_stats) -> list[jax.Array]:
    """The sown per-layer load arrays ([L, E] per scanned stack; [E] per unrolled layer)."""
    return [x for path, x in jax.tree_util.tree_leaves_with_path(moe_stats)
            if "load" in jax.tree_util.keystr(path)]


def routing_loads(moe_stats, routing):
    """Loads arranged like the routing-bias tree: bias leaf at path P ↔ load sown at path P."""
    def find(path, _):
        node = moe_stats
        for key in path[:-1]:              # routing/.../moe/bias → moe_stats/.../moe/load
            node = node[key.key]
        load = node["load"]
        return load[0] if isinstance(load, tuple) else load
    return jax.tree_util.tree_map_with_path(find, routing)


def token_mask(batch: dict) -> jax.Array | None:
    """Which positions hold real tokens, for the MoE statistics: the batch's "token_mask" if it
    has one, else segment_ids ≠ 0 (the data pipeline writes 0 for padding), else None (all)."""
    if batch.get("token_mask") is not None:
        return batch["token_mask"]
    if batch.get("segment_ids") is not None:
        return batch["segment_ids"] != 0
    return None


def model_variables(params, routing) -> dict:
    """What `Transformer.apply` takes: {"params": ..., "routing": ...} (no routing entry when the
    model has no routing bias)."""
    return {"params": params, **({"routing": routing} if routing else {})}


def _forward(params, routing, batch: dict, config: ModelConfig, mtp_weight, balance_alpha):
    """Loss and statistics of one (micro-)batch: (total, (parts, moe_stats)). Under context
    parallelism the batch's [B, T] arrays are put in the zigzag order first (`model.zigzag`:
    every context rank gets the same causal attention work); the loss is a sum over positions,
    so its value does not change."""
    order = zigzag.for_length(batch["tokens"].shape[1])
    if order is not None:
        batch = {k: order.stored(v) if v.ndim == 2 else v                        # [B, T] ones
                 for k, v in batch.items()}
    tokens = batch["tokens"]
    valid = batch.get("valid")
    valid = jnp.ones(tokens.shape, jnp.float32) if valid is None else valid
    variables = model_variables(params, routing)
    (hidden, mtp_hidden, head), aux = Transformer(config).apply(
        variables, tokens, positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"), token_mask=token_mask(batch), order=order,
        mutable=["moe_stats"], method="head_inputs")
    stats = aux.get("moe_stats", {})
    total, parts = losses.head_total_loss(
        hidden, mtp_hidden, head, stats, tokens, valid, mtp_weight=mtp_weight,
        balance_alpha=balance_alpha, dtype=config.dtype, chunk=config.loss_chunk, order=order)
    return total, (parts, stats)


def split_microbatches(batch: dict, k: int) -> dict:
    """[B, ...] → [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, … (strided, so that a
    batch sharded over devices gives every device an equal share of every micro-batch)."""
    def split(x):
        B = x.shape[0]
        if B % k:
            raise ValueError(f"batch {B} is not divisible by microbatches={k}")
        return jnp.swapaxes(x.reshape(B // k, k, *x.shape[1:]), 0, 1)    # [k, B/k, ...]
    return jax.tree.map(split, batch)


def loss_and_grads(params, routing, batch: dict, config: ModelConfig, microbatches: int = 1,
                   mtp_weight=StepSettings.mtp_weight, balance_alpha=StepSettings.balance_alpha):
    """(loss, parts, moe_stats, grads), accumulated over `microbatches` equal micro-batches;
    total = LM + mtp_weight·MTP + balance_alpha·balance.

    Loss, parts and gradients are means over micro-batches; expert loads are summed (they are
    counts over the whole batch either way), balance losses averaged. The routing bias is the
    same for every micro-batch: it changes once per step. With batch["active"], micro-batches
    whose rows are all inactive are skipped and left out of the means.

    With LoRA adapters (`config.adapter_rank`) the gradients are the adapters' only
    (`model.adapters.split`); the other parameters are constants here.
    """
    trained, frozen = adapters.split(params, config)
    grad_fn = jax.value_and_grad(
        lambda t, *args: _forward(adapters.combine(t, frozen), *args), has_aux=True)
    if microbatches == 1:
        (loss, (parts, stats)), grads = grad_fn(trained, routing, batch, config, mtp_weight,
                                               balance_alpha)
        return loss, parts, stats, grads

    mbs = split_microbatches(batch, microbatches)
    first = jax.tree.map(lambda x: x[0], mbs)
    shapes = jax.eval_shape(
        lambda p, b: grad_fn(p, routing, b, config, mtp_weight, balance_alpha), trained, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

    def body(carry, mb):
        acc, count = carry
        run = lambda: jax.tree.map(lambda x: x.astype(jnp.float32),
                                   grad_fn(trained, routing, mb, config, mtp_weight,
                                           balance_alpha))
        if "active" in mb:                          # an empty slot of a batch-size ramp
            on = jnp.max(mb["active"]) > 0
            out, n = jax.lax.cond(on, run, lambda: zeros), on.astype(jnp.float32)
        else:
            out, n = run(), jnp.float32(1)
        return (jax.tree.map(jnp.add, acc, out), count + n), None

    (((loss, (parts, stats)), grads), count), _ = jax.lax.scan(
        body, (zeros, jnp.float32(0)), mbs)
    count = jnp.maximum(count, 1.0)
    mean = lambda t: jax.tree.map(lambda x: x / count, t)
    stats = moe.combine_microbatch_stats(stats, count)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), mean(grads), trained)
    return loss / count, mean(parts), stats, grads


def train_step(state: TrainState, batch: dict, *, config: ModelConfig,
               tx: optax.GradientTransformation, microbatches: int = 1,
               settings: StepSettings = StepSettings()):
    """One optimizer step on `batch` = {"tokens": int [B, T], and optionally "valid" [B, T]
    (loss weight of each target position, see losses.py), "positions" and "segment_ids" [B, T]
    for packed sequences, "token_mask" [B, T] (padding = false; see `token_mask`)}. Returns
    (new state, metrics). Expert loads and balance losses count real tokens only. `settings`
    gives λ, α and γ (scheduled ones are logged as `mtp_weight`, `bias_update_rate`)."""
    mtp_weight, rate = settings.at(state.step)
    loss, parts, stats, grads = loss_and_grads(state.params, state.routing, batch, config,
                                               microbatches, mtp_weight, settings.balance_alpha)
    trained, frozen = adapters.split(state.params, config)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    params = adapters.combine(optax.apply_updates(trained, updates), frozen)

    routing = state.routing
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    for name, value in (("mtp_weight", mtp_weight), ("bias_update_rate", rate)):
        if name in settings.scheduled:
            metrics[name] = value
    if routing:
        loads = routing_loads(stats, routing)
        routing = update_routing_bias(routing, loads, rate)
        all_loads = jnp.concatenate([l.reshape(-1, l.shape[-1]) for l in jax.tree.leaves(loads)])
        metrics["load_imbalance"] = jnp.max(jnp.max(all_loads, -1) / jnp.mean(all_loads, -1))
        biases = jnp.concatenate([b.reshape(-1, b.shape[-1]) for b in jax.tree.leaves(routing)])
        metrics["bias_spread"] = jnp.max(jnp.max(biases, -1) - jnp.min(biases, -1))
    elif stats:
        all_loads = jnp.concatenate([l.reshape(-1, l.shape[-1]) for l in _load_stats(stats)])
        metrics["load_imbalance"] = jnp.max(jnp.max(all_loads, -1) / jnp.mean(all_loads, -1))
    dropped = [x for path, x in jax.tree_util.tree_leaves_with_path(stats)
               if "dropped" in jax.tree_util.keystr(path)]
    if dropped:     # only with moe_capacity_factor > 0: (token, slot) pairs dropped, all layers
        metrics["dropped_tokens"] = sum(jnp.sum(d) for d in dropped)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              routing=routing)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, config: ModelConfig,
              settings: StepSettings = StepSettings()) -> dict:
    """Held-out metrics of one batch: the loss parts (total with the step's λ and α), no update."""
    mtp_weight, _ = settings.at(state.step)
    loss, (parts, _) = _forward(state.params, state.routing, batch, config, mtp_weight,
                                settings.balance_alpha)
    return {"loss": loss, **parts}
