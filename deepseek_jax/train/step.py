"""The train step as one pure function: `train_step(state, batch) -> (state, metrics)`.

  1. forward with `mutable=["moe_stats"]` → logits, MTP logits, per-layer expert loads and
     sequence-balance losses
  2. loss = LM + λ·MTP + α·balance (train/losses.py); gradients w.r.t. params only
  3. optimizer update (optax)
  4. routing bias update b += γ·sign(mean_load − load) from the expert loads of this step. The
     loads are sums over the whole batch array, so under a sharded jit they are global counts
     over every data shard (XLA inserts the reduction), as V3 prescribes.

The state is a plain pytree (`TrainState`); the routing bias lives in `state.routing`, outside
`params`, so the optimizer never sees it and weight decay cannot touch it.

Left out here (added by the pretraining entrypoint): gradient accumulation, fp8, sharding.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import moe
from deepseek_jax.model.transformer import Transformer, init_variables
from deepseek_jax.train import losses


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
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
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


def train_step(state: TrainState, batch: dict, *, config: ModelConfig,
               tx: optax.GradientTransformation):
    """batch = {"tokens": int [B, T], "valid": [B, T] (optional, default all ones)}."""
    model = Transformer(config)
    tokens = batch["tokens"]
    valid = batch.get("valid", jnp.ones(tokens.shape, jnp.float32))

    def loss_fn(params):
        variables = {"params": params, **({"routing": state.routing} if state.routing else {})}
        (logits, mtp_logits), aux = model.apply(variables, tokens, mutable=["moe_stats"])
        stats = aux.get("moe_stats", {})
        total, parts = losses.total_loss(
            logits, mtp_logits, stats, tokens, valid,
            mtp_weight=config.mtp_loss_weight, balance_alpha=config.balance_alpha)
        return total, (parts, stats)

    (loss, (parts, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    routing = state.routing
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
    if routing:
        loads = routing_loads(stats, routing)
        routing = moe.update_routing_bias(routing, loads, config.bias_update_rate)
        all_loads = jnp.concatenate([l.reshape(-1, l.shape[-1]) for l in jax.tree.leaves(loads)])
        metrics["load_imbalance"] = jnp.max(jnp.max(all_loads, -1) / jnp.mean(all_loads, -1))
        biases = jnp.concatenate([b.reshape(-1, b.shape[-1]) for b in jax.tree.leaves(routing)])
        metrics["bias_spread"] = jnp.max(jnp.max(biases, -1) - jnp.min(biases, -1))
    elif stats:
        all_loads = jnp.concatenate([l.reshape(-1, l.shape[-1]) for l in _load_stats(stats)])
        metrics["load_imbalance"] = jnp.max(jnp.max(all_loads, -1) / jnp.mean(all_loads, -1))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              routing=routing)
    return new_state, metrics
