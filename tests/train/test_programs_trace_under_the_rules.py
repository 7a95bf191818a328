"""The trainers' programs other than the train step trace with the mesh and rules in scope.

A jitted function traces at its first call. The eval step (pretraining, SFT) and GRPO's update
and log-probs were made inside `sharding_context` but called outside it, so they traced without
the rules: no `shard_map` around the MoE dispatch, the Mosaic kernels or context-parallel
attention, every activation left to the compiler's propagation. Under fsdp_ep_cp the eval
compile aborted in XLA's partitioner; on TPU the Mosaic kernels would have been left to a
compiler that cannot partition them. `parallel.InContext` now enters the context at every call
and `lower`.

Checked here on the lowered programs under fsdp_ep (8 devices, expert 4): each holds the MoE's
manual computation and its all-to-all, as the train step does; the same function jitted bare,
outside the context, holds neither (so the check can tell the two apart). A run through the
entrypoint under fsdp_ep_cp with eval: tests/experiments/test_pretrain.py
(`test_restore_onto_another_preset`).
"""

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.configs.grpo import get_config as grpo_run_config
from deepseek_jax.configs.pretrain import get_config as pretrain_run_config
from deepseek_jax.rl import policy
from deepseek_jax.train import schedules, sharded
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.run import run_mesh, train_steps
from deepseek_jax.train.step import init_train_state
from deepseek_jax.trainers.pretrain import to_model_config

MARKS = ("sdy.manual_computation", "all_to_all")


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def _expert_parallel(run_config):
    run_config.mesh.preset = "fsdp_ep"
    mesh, rules = run_mesh(run_config.mesh)
    assert mesh.shape["expert"] > 1
    return to_model_config(run_config.model), mesh, rules


def _holds_the_dispatch(text: str) -> bool:
    return all(m in text for m in MARKS)


@pytest.fixture(scope="module")
def pretrain_steps():
    config = pretrain_run_config("tiny")
    model_config, mesh, rules = _expert_parallel(config)
    plan = schedules.from_run_config(config)
    tx, step_fn, eval_fn, batch_sharding = train_steps(config, model_config, plan, mesh, rules)
    state = _abstract(jax.eval_shape(lambda: init_train_state(jax.random.key(0), model_config,
                                                              tx)), step_fn.shardings)
    batch = {k: jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=batch_sharding)
             for k in ("tokens", "segment_ids", "positions")}
    return step_fn, eval_fn, state, batch


def test_the_eval_step_traces_under_the_rules(pretrain_steps):
    step_fn, eval_fn, state, batch = pretrain_steps
    assert _holds_the_dispatch(step_fn.lower(state, batch).as_text())
    assert _holds_the_dispatch(eval_fn.lower(state, batch).as_text())
    # What it was: the same function traced outside the context.
    bare = jax.jit(eval_fn.fn.fn)      # together → InContext → the jitted eval step
    assert not _holds_the_dispatch(bare.lower(state, batch).as_text())


def test_grpo_update_and_logprobs_trace_under_the_rules():
    config = grpo_run_config("tiny")
    model_config, mesh, rules = _expert_parallel(config)
    tx = make_optimizer(1e-3)
    shardings = sharded.state_shardings(model_config, mesh, rules, tx)
    update, logprobs, _ = policy.compile_steps(model_config, tx, shardings, mesh, rules,
                                               config.rl)
    state = _abstract(jax.eval_shape(lambda: init_train_state(jax.random.key(0), model_config,
                                                              tx)), shardings)
    tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    assert _holds_the_dispatch(logprobs.lower(state.params, state.routing, tokens).as_text())
    rows = {k: jax.ShapeDtypeStruct((8, 32), jnp.float32)
            for k in ("mask", "old_logp", "ref_logp")}
    batch = {"tokens": tokens, "token_mask": jax.ShapeDtypeStruct((8, 32), jnp.bool_),
             "advantages": jax.ShapeDtypeStruct((8,), jnp.float32), **rows}
    assert _holds_the_dispatch(update.lower(state, batch).as_text())
