"""The GRPO policy: its checks, its starting state and its compiled steps, under the run's mesh.

  check_policy   the model against the mesh, the tokenizer and the workdir, before any read
  start_step     the step of the starting run this run reads (recorded in WORKDIR/start.json)
  initial_state  TrainState from a pretraining run's weights (read straight into the run's
                 shardings) or a random init, plus a frozen copy as the reference model when
                 β > 0 (with LoRA adapters: new adapters on those weights, and no copy)
  checkpointed   the state a checkpoint saves (a LoRA run: by default its adapters alone)
  restore_state  the latest checkpoint's state, a LoRA run's frozen weights read back from its
                 start when its checkpoints leave them out
  compile_steps  the jitted update (`rl.step.grpo_step`, state donated) and the jitted
                 trainer log-probs (for π_old and π_ref), both under the run's shardings
  sampled_model  the model the rollouts sample (with adapters: the plain model, merged)
  to_device      one rollout batch placed on the mesh

Left out: resetting the reference model during the run (R1-Zero resets it every 400 steps).
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.model import adapters, init_variables
from deepseek_jax.rl.step import grpo_step, target_logprobs
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import sharded
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.step import TrainState, init_train_state


def check_policy(model_config: ModelConfig, mesh, rules, batch_rows: int, encoder: Encoder,
                 workdir: str) -> None:
    """Errors that name the fix: a model the mesh can't shard at `batch_rows` rows, a vocabulary
    smaller than the tokenizer's, a workdir holding a run of another model."""
    sharded.validate(model_config, mesh, rules, batch_rows)
    if model_config.vocab_size < encoder.vocab_size:
        raise ValueError(f"the model's vocab_size {model_config.vocab_size} is smaller than the "
                         f"tokenizer's {encoder.vocab_size}: set data.tokenizer to the model's "
                         "tokenizer.json (an HF-imported model needs its own)")
    run_dir.check_same_model(workdir, model_config)


def start_step(workdir: str, pretrained: str) -> int | None:
    """The step of `pretrained` this run starts from (None without one): the one recorded in
    WORKDIR/start.json by an earlier attempt, else its latest, then recorded. A resumed run
    thus reads the weights it started from even after the starting run saved newer steps."""
    if not pretrained:
        return None
    recorded = ckpt.load_start(workdir)
    if recorded is not None:
        if recorded[0] != pretrained:
            raise ValueError(f"{workdir} started from {recorded[0]}, but init.pretrain_dir is "
                             f"now {pretrained}: pass the same run (if it moved, write its new "
                             f"path into {workdir}/start.json), or start a new --workdir")
        return recorded[1]
    steps = ckpt.saved_steps(pretrained)
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {pretrained}/checkpoints: "
                                "init.pretrain_dir must be a training run or a converted "
                                "checkpoint")
    if jax.process_index() == 0:
        ckpt.save_start(workdir, pretrained, steps[-1])
    return steps[-1]


def lean_checkpoints(run_config, model_config: ModelConfig, pretrained: str) -> bool:
    """Whether the run's checkpoints leave its frozen weights out: a LoRA run from a starting
    run, unless `adapter.save_frozen` (a random start has nothing to read them back from)."""
    return bool(model_config.adapter_rank and pretrained and not run_config.adapter.save_frozen)


def checkpointed(state: TrainState, model_config: ModelConfig, lean: bool) -> TrainState:
    """The state a checkpoint saves: with `lean`, the parameters are the adapters alone."""
    if not lean:
        return state
    return state.replace(params=adapters.split(state.params, model_config)[0])


def restore_state(manager, model_config: ModelConfig, tx, shardings: TrainState, workdir: str,
                  frozen=None):
    """(state, rng, data_state) of the latest checkpoint. A checkpoint of adapters only gets
    its frozen weights from `frozen` (the tree already on the mesh) or else from the run it
    started from, at the recorded step (`checkpoint.frozen_from_start`)."""
    if not model_config.adapter_rank or ckpt.holds_frozen(ckpt.saved_params(manager)):
        return ckpt.restore_train_state(manager, model_config, tx, shardings)
    trained_s, frozen_s = adapters.split(shardings.params, model_config)
    shapes = jax.eval_shape(lambda: init_train_state(jax.random.key(0), model_config, tx))
    shapes = shapes.replace(params=adapters.split(shapes.params, model_config)[0])
    state, rng, data_state = ckpt.restore(
        manager, ckpt.abstract_like(shapes, shardings.replace(params=trained_s)))
    if frozen is None:
        frozen = ckpt.frozen_from_start(workdir, model_config, frozen_s)
    return state.replace(params=adapters.combine(state.params, frozen)), rng, data_state


def initial_state(model_config: ModelConfig, tx, shardings: TrainState, pretrained: str, *,
                  seed: int, keep_reference: bool, step: int | None = None):
    """(state at step 0, reference params or None). `pretrained` is a run directory ("" = a
    random init from `seed`), read at `step` (None: its latest; `start_step`); the reference
    is a copy, since the update donates the policy.

    With LoRA adapters (`model_config.adapter_rank`) the weights read are the starting run's
    merged (`load_trained(merged=True)`: a run trained with adapters starts the next one as a
    plain model), new adapters are drawn from `seed` (B = 0: the policy starts as the base),
    and no copy is kept: the reference is the policy with its adapters off
    (`model.adapters.disabled`, see `compile_steps`)."""
    trained_s, frozen_s = adapters.split(shardings.params, model_config)
    base_s = frozen_s if model_config.adapter_rank else trained_s
    if pretrained:
        _, variables = ckpt.load_trained(pretrained, step, shardings={
            "params": base_s, "routing": shardings.routing}, merged=True)
    else:
        variables = flax.core.meta.unbox(init_variables(jax.random.key(seed),
                                                        adapters.plain(model_config)))
    place = lambda tree, s: jax.tree.map(parallel.to_global, tree, s)   # multi-process too
    params = place(variables["params"], base_s)
    stored = jnp.dtype(model_config.param_dtype)
    if model_config.adapter_rank and any(x.dtype != stored for x in jax.tree.leaves(params)):
        params = jax.jit(                         # frozen weights stored as the config says
            lambda t: jax.tree.map(lambda x: x.astype(model_config.param_dtype), t),
            out_shardings=base_s)(params)
    routing = place(variables.get("routing", {}), shardings.routing)
    reference = jax.tree.map(jnp.copy, params) if keep_reference else None
    if model_config.adapter_rank:
        new = jax.jit(lambda key: adapters.split(flax.core.meta.unbox(
            init_variables(key, model_config))["params"], model_config)[0],
            out_shardings=trained_s)(jax.random.key(seed))       # the base's init: dead code
        params, reference = adapters.combine(new, params), None
    # The step placed as the update returns it: an unplaced one is another input type to the
    # jitted update, which then compiled a second time at the second step.
    state = TrainState(step=parallel.to_global(jnp.zeros((), jnp.int32), shardings.step),
                       params=params,
                       opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(
                           adapters.split(params, model_config)[0]),
                       routing=routing)
    return state, reference


def compile_steps(model_config: ModelConfig, tx, shardings: TrainState, mesh, rules, rl):
    """(update(state, batch) -> (state, metrics), logprobs(params, routing, tokens) -> [B, T],
    reference_logprobs(params, routing, tokens)) for the run config's `rl` section.

    `reference_logprobs` is `logprobs` on the reference model's parameters; with LoRA adapters
    it takes the policy's own and turns the adapters off (`adapters.disabled`)."""
    update = jax.jit(functools.partial(
        grpo_step, config=model_config, tx=tx, temperature=rl.temperature,
        eps_low=rl.eps_low, eps_high=rl.eps_high, beta=rl.beta,
        aggregation=rl.aggregation, max_len=rl.max_new_tokens,
        bias_update_rate=rl.bias_update_rate),
        in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    logprobs = jax.jit(lambda p, r, t: target_logprobs(p, r, t, model_config,
                                                       rl.temperature)[0])
    in_context = lambda fn: parallel.InContext(fn, mesh, rules)  # noqa: E731 (trace in them)
    logprobs = parallel.together(in_context(logprobs), "log-probs")
    reference = logprobs
    if model_config.adapter_rank:
        reference = parallel.together(in_context(jax.jit(
            lambda p, r, t: target_logprobs(adapters.disabled(p, model_config), r, t,
                                            model_config, rl.temperature)[0])),
            "reference log-probs")
    return parallel.together(in_context(update), "GRPO update"), logprobs, reference


def sampled_model(model_config: ModelConfig, shardings: TrainState):
    """(config, weights(params) -> params) of the model the rollouts and evaluations sample:
    the policy itself, or with LoRA adapters the plain model on W + s·A·B, merged once per
    call (`adapters.merge`) and laid out like the frozen weights. Sampling the adapter model
    instead would add the low-rank terms to every projection and rebuild W_UK's, W_UV's and
    the experts' W' at each token; merged once, the rollouts hold one extra copy of the
    adapted weights."""
    if not model_config.adapter_rank:
        return model_config, lambda params: params
    frozen = adapters.split(shardings.params, model_config)[1]
    merge = jax.jit(lambda p: adapters.merge(p, model_config), out_shardings=frozen)
    return adapters.plain(model_config), merge


def to_device(rows: dict, advantages, mesh, rules) -> dict:
    """The update's batch from `rollout.training_rows` and the advantages [B], sharded like a
    training batch over its rows."""
    rows_sharding = parallel.batch_sharding(mesh, rules)
    by_row = NamedSharding(mesh, P(*rows_sharding.spec[:1]))
    batch = {k: parallel.to_global(rows[k], rows_sharding)
             for k in ("tokens", "mask", "token_mask")}
    batch["advantages"] = parallel.to_global(advantages, by_row)
    return batch
