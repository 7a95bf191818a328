"""Sharded initialization and the sharded train step: `train_step` under jit with shardings.

  state = init_sharded_state(rng, config, tx, mesh, rules)      # born sharded, never gathered
  step = make_sharded_train_step(config, tx, mesh, rules)
  state, metrics = step(state, batch)                           # state donated

Both check the shardings first (`sharding.validate`) and trace inside `sharding_context`, so the
activation constraints in the model follow the same rules as the parameters. The step is
`deepseek_jax.train.step.train_step` unchanged: jit's in/out shardings place the state and the
batch, and the compiler inserts the collectives (all-gathers of FSDP weights, gradient
reduce-scatters, the global expert-load sums for the bias update).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.rules import Rules, sharding_context
from deepseek_jax.parallel.sharding import (batch_sharding, check_global_batch, state_shardings,
                                            validate)
from deepseek_jax.train.step import TrainSchedules, TrainState, init_train_state, train_step


def init_sharded_state(rng: jax.Array, config: ModelConfig, tx: optax.GradientTransformation,
                       mesh: Mesh, rules: Rules) -> TrainState:
    """`init_train_state` compiled with the state's shardings as `out_shardings`.

    Every device computes only its shards, so a model larger than one device's memory can be
    initialized. Values equal the unsharded init (JAX's partitionable threefry RNG).
    """
    validate(config, mesh, rules)
    shardings = state_shardings(config, mesh, rules, tx)
    init = jax.jit(lambda key: init_train_state(key, config, tx), out_shardings=shardings)
    with sharding_context(mesh, rules):
        return init(rng)


def make_sharded_train_step(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                            rules: Rules, microbatches: int = 1,
                            schedule: TrainSchedules | None = None
                            ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step` jitted with the state and batch shardings; the input state is donated.
    `microbatches` > 1 accumulates gradients over that many strided micro-batches; `schedule`
    (λ and γ per step) is passed through.

    Returns:
      step(state, batch) -> (state, metrics), metrics replicated scalars. `step.lower(state,
      batch)` lowers it (inside the sharding context) for ahead-of-time compiles and analysis;
      `step.shardings` is the TrainState of NamedShardings it expects.
    """
    validate(config, mesh, rules)
    shardings = state_shardings(config, mesh, rules, tx)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(functools.partial(train_step, config=config, tx=tx,
                                       microbatches=microbatches, schedule=schedule),
                     in_shardings=(shardings, batch_sharding(mesh, rules)),
                     out_shardings=(shardings, replicated), donate_argnums=0)

    def step(state: TrainState, batch: dict):
        check_global_batch(mesh, rules, batch["tokens"].shape[0])
        with sharding_context(mesh, rules):
            return jitted(state, batch)

    def lower(state, batch):
        check_global_batch(mesh, rules, batch["tokens"].shape[0])
        with sharding_context(mesh, rules):
            return jitted.lower(state, batch)

    step.lower = lower
    step.shardings = shardings
    return step
