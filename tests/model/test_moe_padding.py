"""Padding stays out of the MoE balancing statistics (expert loads for the bias update and the
sequence-wise balance loss), on every dispatch path, in pretraining batches and in GRPO rows.

The reference is always the same tokens without the padding: a right-padded row must give the
loads and balance loss of its real tokens alone. Loads are integer counts (exact); balance
losses are fp32 sums of O(1) terms over a handful of tokens whose inputs differ only in the
summation order of attention over masked (exactly zero) keys, so 1e-6 relative is ample.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import parallel as par
from deepseek_jax.config import get_config
from deepseek_jax.model import Transformer, init_variables, moe, routing
from deepseek_jax.rl import rollout
from deepseek_jax.train import step as train_step_lib
from deepseek_jax.rl.step import target_logprobs

TOL = 1e-6


def _randn(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _np_balance(scores, idx, lengths, E):
    """Eqs. 17–20 per sequence over its first `lengths[b]` tokens, then the mean over sequences
    that have any (a plain loop, float64)."""
    scores, idx = np.asarray(scores, np.float64), np.asarray(idx)
    X = idx.shape[-1]
    per_seq = []
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        f = np.bincount(idx[b, :n].reshape(-1), minlength=E) * E / (X * n)
        s = scores[b, :n] / scores[b, :n].sum(-1, keepdims=True)
        per_seq.append(np.dot(f, s.mean(0)))
    return np.mean(per_seq)


def test_balance_loss_and_load_leave_padding_out():
    c = get_config("tiny")
    E, B, T = c.n_routed_experts, 4, 7
    lengths = [7, 3, 0, 5]                                  # one full row, one of padding only
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]          # [B, T]
    _, idx, scores = routing.gate(_randn(0, (B, T, E)), None, c)
    got = routing.sequence_balance_loss(scores, idx, E, jnp.asarray(mask))
    np.testing.assert_allclose(float(got), _np_balance(scores, idx, lengths, E), rtol=TOL)
    # Unmasked, the same function is the plain mean over all rows and positions.
    np.testing.assert_allclose(float(routing.sequence_balance_loss(scores, idx, E)),
                               _np_balance(scores, idx, [T] * B, E), rtol=TOL)
    want = np.bincount(np.asarray(idx)[mask].reshape(-1), minlength=E)
    np.testing.assert_array_equal(np.asarray(routing.expert_load(idx, E, jnp.asarray(mask))), want)
    assert float(routing.expert_load(idx, E).sum()) == B * T * c.n_experts_per_token


def _stats(variables, config, tokens, token_mask):
    (_, _), aux = Transformer(config).apply(variables, tokens, token_mask=token_mask,
                                            mutable=["moe_stats"])
    st = aux["moe_stats"]
    loads = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(st)
             if "load" in jax.tree_util.keystr(p)]
    balance = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(st)
               if "balance_loss" in jax.tree_util.keystr(p)]
    return loads, balance


@pytest.mark.parametrize("moe_impl", ["dense", "ragged"])
def test_right_padding_does_not_change_the_statistics(moe_impl):
    # Main stacks and the MTP module (which has its own MoE block): the same real tokens with
    # 2 or 9 padding columns after them give the same loads and balance losses.
    c = get_config("tiny", moe_impl=moe_impl)
    variables = init_variables(jax.random.key(1), c)
    real = np.random.default_rng(2).integers(2, c.vocab_size, (3, 6))
    lengths = np.array([6, 4, 5])
    runs = []
    for pad in (2, 9):
        tokens = np.zeros((3, 6 + pad), np.int32)
        tokens[:, :6] = real
        mask = np.arange(6 + pad)[None, :] < lengths[:, None]
        tokens[~mask] = 0                                    # padding id
        runs.append(_stats(variables, c, jnp.asarray(tokens), jnp.asarray(mask)))
    (loads_a, bal_a), (loads_b, bal_b) = runs
    assert len(loads_a) == 2                                 # the MoE stack and the MTP block
    for a, b in zip(loads_a, loads_b):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(bal_a, bal_b):
        np.testing.assert_allclose(a, b, rtol=TOL)
    # Counted: every real token's X choices in each of the n_moe_layers layers.
    X = c.n_experts_per_token
    assert loads_a[0].sum() == lengths.sum() * X * c.n_moe_layers
    # MTP depth 1 counts position i when tokens i and i+1 are both real.
    assert loads_a[1].sum() == (lengths - 1).sum() * X


def test_local_and_expert_parallel_paths_leave_padding_out():
    # The sharded MoE paths route and count inside shard_maps; they must agree with the
    # single-device masked statistics.
    c = get_config("tiny")
    B, T = 8, 6
    x = _randn(3, (B, T, c.d_model))
    variables = jax.jit(moe.MoE(c).init)(jax.random.key(0), x)
    variables = {**variables, "routing": {"bias": 0.01 * jnp.arange(8.0) - 0.03}}
    mask = jnp.asarray(np.arange(T)[None, :] < np.array([6, 2, 0, 5, 1, 6, 3, 4])[:, None])

    def stats(config):
        fn = jax.jit(lambda v, x, m: moe.MoE(config).apply(v, x, m, mutable=["moe_stats"])[1])
        st = fn(variables, x, mask)["moe_stats"]
        return np.asarray(st["load"][0]), float(st["balance_loss"][0])

    ref_load, ref_bal = stats(c.replace(moe_impl="dense"))
    assert ref_load.sum() == int(mask.sum()) * c.n_experts_per_token
    for preset, shape in (("fsdp", {"fsdp": 8}), ("fsdp_ep", {"fsdp": 2, "expert": 4})):
        mesh, rules = par.mesh_and_rules(preset, shape)
        with par.sharding_context(mesh, rules):
            load, bal = stats(c.replace(moe_impl="ragged"))
        np.testing.assert_array_equal(load, ref_load, err_msg=preset)
        np.testing.assert_allclose(bal, ref_bal, rtol=TOL, err_msg=preset)


def test_train_step_takes_padding_from_segment_ids():
    batch = {"tokens": jnp.ones((1, 4), jnp.int32),
             "segment_ids": jnp.asarray([[1, 1, 2, 0]])}
    np.testing.assert_array_equal(np.asarray(train_step_lib.token_mask(batch)),
                                  [[True, True, True, False]])
    assert train_step_lib.token_mask({"tokens": batch["tokens"]}) is None


def test_grpo_rows_mark_padding_and_keep_it_out_of_the_loads():
    rows = rollout.training_rows([[0, 5, 6], [0, 7]], [[8, 1], [9, 9, 9, 1]], length=9)
    np.testing.assert_array_equal(rows["token_mask"], [[1, 1, 1, 1, 1, 0, 0, 0, 0],
                                                       [1, 1, 1, 1, 1, 1, 0, 0, 0]])
    # The loads the GRPO step feeds to the bias update: the same rows padded to 9 or to 16.
    c = get_config("tiny", vocab_size=320)
    variables = init_variables(jax.random.key(4), c)
    wide = rollout.training_rows([[0, 5, 6], [0, 7]], [[8, 1], [9, 9, 9, 1]], length=16)
    loads = []
    for r in (rows, wide):
        *_, st = target_logprobs(variables["params"], variables["routing"],
                                 jnp.asarray(r["tokens"]), c, 1.0, jnp.asarray(r["token_mask"]))
        loads.append(np.asarray(st["moe_layers"]["layers"]["moe"]["load"][0]))
    np.testing.assert_array_equal(loads[0], loads[1])
    assert loads[0].sum() == 11 * c.n_experts_per_token * c.n_moe_layers
