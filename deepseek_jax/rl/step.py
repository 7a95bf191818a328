"""One GRPO policy update as a pure function: `grpo_step(state, batch) -> (state, metrics)`.

A batch holds P·G right-padded rows `tokens [B, T]` = prompt + completion (+ padding). Position i
scores token i+1, so every array indexed by position is aligned to the *target* token:

  mask      [B, T]  1 where tokens[i+1] is a completion token (its EOS included), else 0
  old_logp  [B, T]  log π_old(tokens[i+1]) at those positions, computed once per batch
  ref_logp  [B, T]  the frozen reference model's, only when β > 0
  advantages [B]    group-relative, one per completion
  token_mask [B, T] optional: 1 for prompt and completion tokens, 0 for the padding after them
                    (keeps padding out of the expert loads and balance loss; `rollout` writes it)

The loss is `rl.loss.grpo_loss` over log-probs under softmax(logits / temperature), the logits
computed `config.loss_chunk` positions at a time and recomputed in the backward pass, as in
pretraining (`model.head.map_head_chunks`). After the optimizer update the routing bias moves by
γ = `bias_update_rate` from the expert loads of this batch, as in pretraining (the balancing
keeps working during RL; 0 freezes it). The state is `train.step.TrainState`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import adapters
from deepseek_jax.model.head import map_head_chunks
from deepseek_jax.model.routing import update_routing_bias
from deepseek_jax.model.transformer import Transformer
from deepseek_jax.rl import loss as loss_lib
from deepseek_jax.sampling.sample import tempered_log_softmax, token_logprobs
from deepseek_jax.train.schedules import StepSettings
from deepseek_jax.train.step import TrainState, model_variables, routing_loads


def target_logprobs(params, routing, tokens, config: ModelConfig, temperature: float,
                    token_mask=None, entropy: bool = True):
    """(logp [B, T] of tokens[i+1] at position i (0 at the last), entropy [B, T] (zeros with
    entropy=False, which skips its pass over the vocabulary), moe_stats); `token_mask` [B, T]
    (None = all real) only shapes the MoE statistics. The head is applied `config.loss_chunk`
    positions at a time (model/head.py), so no [B, T, V] logits are held."""
    (hidden, _, head), aux = Transformer(config).apply(
        model_variables(params, routing), tokens, token_mask=token_mask,
        mutable=["moe_stats"], method="head_inputs")
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)           # [B, T]

    def per_position(logits, targets):                  # logits [B, t, V] → ([B, t], [B, t])
        logp = token_logprobs(logits, targets, temperature)                     # [B, t]
        if not entropy:
            return logp, jnp.zeros_like(logp)
        logp_all = tempered_log_softmax(logits, temperature)                    # [B, t, V]
        return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)            # [B, t] ×2

    logp, ent = map_head_chunks(per_position, hidden, head, targets, dtype=config.dtype,
                                chunk=config.loss_chunk)                        # [B, T] each
    last = jnp.arange(tokens.shape[1]) == tokens.shape[1] - 1
    return jnp.where(last, 0.0, logp), ent, aux.get("moe_stats", {})


def grpo_step(state: TrainState, batch: dict, *, config: ModelConfig,
              tx: optax.GradientTransformation, temperature: float, eps_low: float,
              eps_high: float, beta: float, aggregation: str, max_len: int,
              bias_update_rate: float = StepSettings.bias_update_rate):
    trained, frozen = adapters.split(state.params, config)   # LoRA: the adapters are trained

    def loss_fn(trained):
        params = adapters.combine(trained, frozen)
        logp, entropy, stats = target_logprobs(params, state.routing, batch["tokens"], config,
                                               temperature, batch.get("token_mask"))
        loss, metrics = loss_lib.grpo_loss(
            logp, batch["old_logp"], batch["advantages"], batch["mask"],
            ref_logp=batch.get("ref_logp"), eps_low=eps_low, eps_high=eps_high, beta=beta,
            aggregation=aggregation, max_len=max_len)
        m = batch["mask"]
        metrics["entropy"] = jnp.sum(entropy * m) / jnp.maximum(jnp.sum(m), 1.0)
        return loss, (metrics, stats)

    (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    params = adapters.combine(optax.apply_updates(trained, updates), frozen)
    routing = state.routing
    if routing:
        routing = update_routing_bias(routing, routing_loads(stats, routing),
                                      bias_update_rate)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         routing=routing), metrics
