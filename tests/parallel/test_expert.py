"""Expert parallelism (`deepseek_jax.model.dispatch`) on 8 fake CPU devices, and the local
dispatch it falls back to when the batch is split but the experts are not (dp, fsdp, fsdp_tp).

The reference everywhere is the single-device dense dispatch (`dispatch.dense_dispatch`: every expert
on every token, no sort, no exchange) or the MoE module without a mesh.

Tolerance: EP computes the same fp32 products as the reference; only summation order differs
(grouped GEMM vs dense einsum, partial sums across devices for FSDP/TP gradients and for the
expert width split over the tensor axis). Values are
O(1) sums of ≤ 64 terms, so differences are ~1e-7; 1e-5 absolute/relative is far below any
routing or exchange bug (O(1e-1)).
"""

import contextlib
import io
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel as par
from deepseek_jax.config import ConfigError, get_config
from deepseek_jax.model import dispatch, moe, routing
from deepseek_jax.model.blocks import remat_policy
from deepseek_jax.parallel.mesh import MeshError
from deepseek_jax.tools import hlo
from deepseek_jax.train import sharded

TOL = 1e-5
B, T = 8, 6


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(a, b, msg=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL, err_msg=msg)


# --- the module on several meshes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def module_setup():
    c = get_config("tiny")
    x = _randn(0, (B, T, c.d_model))
    variables = jax.jit(moe.MoE(c).init)(jax.random.key(0), x)
    variables = {**variables, "routing": {"bias": 0.01 * jnp.arange(8.0) - 0.03}}

    def grads(config):
        def loss(params, x):
            y, st = moe.MoE(config).apply({**variables, "params": params}, x,
                                          mutable=["moe_stats"])
            # The balance loss joins the loss so that its gradient is checked too.
            stats = st["moe_stats"]
            loss = jnp.sum(y * jnp.cos(y)) + stats["balance_loss"][0]
            return loss, (y, stats["load"][0])
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    reference = grads(c.replace(moe_impl="dense"))(variables["params"], x)
    return c, x, variables, grads, reference


@pytest.mark.parametrize("preset,mesh_config,transport", [
    ("fsdp_ep", {"fsdp": 2, "expert": 4}, "all_to_all"),
    ("dp_ep_tp", {"data": 2, "expert": 2, "tensor": 2}, "all_to_all"),
    ("fsdp_ep", {"fsdp": 1, "expert": 8}, "ragged_all_to_all_emulated"),
])
def test_module_under_ep_matches_dense_reference(module_setup, preset, mesh_config, transport):
    c, x, variables, grads, ((rp, rx), (ry, rload)) = module_setup
    mesh, rules = par.mesh_and_rules(preset, mesh_config)
    config = c.replace(moe_ep_transport=transport)
    with par.sharding_context(mesh, rules):
        assert routing.layout_from_context(config).n_shards == mesh.shape["expert"]
        fn = grads(config)
        hlo = fn.lower(variables["params"], x).as_text()
        (gp, gx), (y, load) = fn(variables["params"], x)
    assert "all_to_all" in hlo or "all-to-all" in hlo          # the EP path, not GSPMD
    _close(y, ry, "y")
    _close(gx, rx, "dx")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(gp)),
                            jax.tree.leaves(nn.unbox(rp))):
        _close(a, b, jax.tree_util.keystr(path))
    # Loads are global counts: the whole batch's (token, slot) choices, on every device.
    np.testing.assert_array_equal(np.asarray(load), np.asarray(rload))
    assert float(load.sum()) == B * T * c.n_experts_per_token


@pytest.mark.parametrize("policy, saved", [
    ("minimal", ["expert_hidden", "expert_hidden", "expert_out", "expert_rows"]),
    ("custom:expert_rows=save,expert_out=offload", ["expert_out (host)", "expert_rows"]),
    ("full", []),
])
def test_named_remat_under_ep_keeps_the_received_rows_and_changes_no_gradient(
        module_setup, policy, saved):
    """Under a named rematerialization policy the EP exchange's named activations are what the
    shard_map keeps for the backward pass (expert_rows: the rows received, [rows, D], so the
    backward pass need not exchange them again; expert_hidden [rows, F]; expert_out as
    combined, [B, T, X, D]), and the gradients are the dense reference's (the same sums,
    recomputed)."""
    c, x, variables, _, ((rp, rx), _) = module_setup
    mesh, rules = par.mesh_and_rules("fsdp_ep", {"fsdp": 2, "expert": 4})
    config = c.replace(moe_ep_transport="all_to_all")

    def loss(params, x):
        y, st = moe.MoE(config).apply({**variables, "params": params}, x, mutable=["moe_stats"])
        return jnp.sum(y * jnp.cos(y)) + st["moe_stats"]["balance_loss"][0]

    checkpointed = jax.checkpoint(loss, policy=remat_policy(policy))
    with par.sharding_context(mesh, rules):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(checkpointed, variables["params"], x)
        gp, gx = jax.jit(jax.grad(checkpointed, argnums=(0, 1)))(variables["params"], x)
    kinds = {(2, c.d_model): "expert_rows", (2, c.moe_d_ff): "expert_hidden",
             (4, c.d_model): "expert_out"}
    kept = sorted(kinds[shape.count(",") + 1, int(shape.split(",")[-1])]
                  + (" (host)" if host else "")
                  for host, shape in re.findall(r"f32(<host>)?\[([\d,]+)\] output of shard_map",
                                                out.getvalue()))
    assert kept == saved
    _close(gx, rx, "dx")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(gp)),
                            jax.tree.leaves(nn.unbox(rp))):
        _close(a, b, jax.tree_util.keystr(path))


@pytest.mark.parametrize("preset,mesh_config,chunks", [
    ("dp", {"data": 8}, 1),
    ("fsdp", {"data": 2, "fsdp": 4}, 1),
    ("fsdp", {"data": 2, "fsdp": 4}, 4),            # experts gathered 2 at a time
    ("fsdp_tp", {"fsdp": 2, "tensor": 4}, 1),       # F = 16 of the experts split 4 ways
])
def test_module_without_expert_axis_matches_dense_reference(module_setup, preset, mesh_config,
                                                            chunks):
    # E whole, batch split: each device dispatches its own tokens (local shard_map, no exchange).
    c, x, variables, grads, ((rp, rx), (ry, rload)) = module_setup
    c = c.replace(moe_expert_chunks=chunks)
    mesh, rules = par.mesh_and_rules(preset, mesh_config)
    with par.sharding_context(mesh, rules):
        layout = routing.layout_from_context(c, batch_size=B)
        assert layout.n_shards == 1 and layout.expert_axes == ()
        assert layout.mlp_axes == (("tensor",) if preset == "fsdp_tp" else ())
        (gp, gx), (y, load) = grads(c)(variables["params"], x)
    _close(y, ry, "y")
    _close(gx, rx, "dx")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(gp)),
                            jax.tree.leaves(nn.unbox(rp))):
        _close(a, b, jax.tree_util.keystr(path))
    np.testing.assert_array_equal(np.asarray(load), np.asarray(rload))


def _collective_sizes(text: str, op: str) -> list[int]:
    """Element counts of the results of the `op` collectives in compiled HLO `text`."""
    sizes = []
    for line in text.splitlines():
        if f" {op}(" in line or f" {op}-start(" in line:
            shape = line.split("=", 1)[1].split(f" {op}")[0]
            sizes += [math.prod(int(d) for d in dims.split(",") if d)
                      for dims in re.findall(r"[a-z][a-z0-9]*\[([0-9,]*)\]", shape)]
    return sizes


def test_fsdp_experts_gathered_a_chunk_at_a_time(module_setup):
    # Under fsdp=8 the routed weights are split along D; with 4 chunks no collective holds more
    # than a quarter of one expert matrix, forward or backward, and the gradients leave as
    # reduce-scatters of chunk size.
    c, x, variables, grads, _ = module_setup
    E, D, F = c.n_routed_experts, c.d_model, c.moe_d_ff
    mesh, rules = par.mesh_and_rules("fsdp", {"fsdp": 8})
    with par.sharding_context(mesh, rules):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("fsdp")))
        text = grads(c.replace(moe_expert_chunks=4)).lower(variables["params"], xs) \
            .compile().as_text()
    gathers = _collective_sizes(text, "all-gather")
    assert E // 4 * D * F in gathers
    assert max(gathers) < E * D * F
    assert E // 4 * D * F // 8 in _collective_sizes(text, "reduce-scatter")
    assert max(_collective_sizes(text, "all-reduce")) < E * D * F
    # Each chunk of each of the three weights is gathered once in the forward loop and once in
    # the backward loop (no remat here): 2 × 3 × 4 executions, as the planner counts them.
    chunk_bytes = E // 4 * D * F * 4                                          # fp32
    stats = hlo.collective_stats(text)
    assert sum(c.executions for c in stats.collectives
               if c.kind == "all-gather" and c.result_bytes == chunk_bytes) == 2 * 3 * 4


def test_expert_chunks_auto_gathers_at_most_a_gib_at_a_time():
    # V3's 256 experts of [7168, 2048] are 7 GiB per projection in bf16: 8 chunks of 0.9 GiB.
    # V2-Lite's whole experts are 0.4 GiB: one chunk. An explicit count is kept.
    assert dispatch.expert_chunks(get_config("v3-671b")) == 8
    assert dispatch.expert_chunks(get_config("v2-lite", dtype=jnp.bfloat16)) == 1
    assert dispatch.expert_chunks(get_config("v3-671b", moe_expert_chunks=4)) == 4
    assert dispatch.expert_chunks(get_config("v3-671b", n_routed_experts=0)) == 1
    with pytest.raises(ConfigError, match="moe_expert_chunks=3: use 0 .auto. or a divisor"):
        get_config("tiny", moe_expert_chunks=3)


def test_layout_without_expert_axis():
    c = get_config("tiny")
    assert routing.layout_from_context(c) is None                     # no mesh
    for preset, sizes in [("dp", {"data": 1}), ("fsdp", {"fsdp": 8})]:
        mesh, rules = par.mesh_and_rules(preset, sizes, jax.devices()[:math.prod(sizes.values())])
        with par.sharding_context(mesh, rules):
            layout = routing.layout_from_context(c, batch_size=8)
            odd = routing.layout_from_context(c, batch_size=3)        # does not split: compiler
        assert odd is None
        assert layout == (None if preset == "dp" else routing.EPLayout((), ("fsdp",), (), 1))


def _batch_wide_collectives(text, n_tokens, n_pairs):
    """(shape, kind) of every collective in compiled HLO `text` that moves an array spanning the
    whole batch with more than one value per token: leading dims (B, T, ...) or B·T or B·T·X."""
    from deepseek_jax.tools import hlo
    shapes = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s", line)
        if m:
            shapes[m.group(1)] = m.group(2)
    found = []
    for coll in hlo.collective_stats(text).collectives:
        for dtype, dims in re.findall(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]", shapes[coll.name]):
            d = [int(v) for v in dims.split(",") if v]
            lead = (d[0] * d[1] if len(d) > 1 and d[:2] == [B, T] else
                    d[0] if d and d[0] in (n_tokens, n_pairs) else 0)
            if lead and math.prod(d) > n_tokens:
                found.append((f"{dtype}{d}", coll.kind))
    return found


def test_fsdp_step_gathers_no_routing_arrays_over_the_batch(module_setup, monkeypatch):
    # The MoE layer's forward + backward under fsdp=8 (one sequence per device), compiled. Without
    # the local path, the compiler gathers scores [B, T, E], group scores and the pair ids
    # [B·T·X], and all-reduces token copies [B·T·X, D] (checked below by switching it off), which
    # at V3's size on 512 chips was 280 GiB of temporaries per chip.
    c, x, variables, grads, _ = module_setup
    mesh, rules = par.mesh_and_rules("fsdp", {"fsdp": 8})
    n_tokens, n_pairs = B * T, B * T * c.n_experts_per_token

    def compiled_text():
        with par.sharding_context(mesh, rules):
            xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("fsdp")))
            return grads(c).lower(variables["params"], xs).compile().as_text()
    assert _batch_wide_collectives(compiled_text(), n_tokens, n_pairs) == []
    monkeypatch.setattr(routing, "layout_from_context", lambda *a, **k: None)
    compiler = _batch_wide_collectives(compiled_text(), n_tokens, n_pairs)
    assert ("f32" + str([B, T, c.n_routed_experts]), "all-gather") in compiler


# --- the exchange itself: skewed routing, overflow rounds, both transports -------------------------

_E, _D, _F, _X = 8, 8, 4, 2


def _skewed(seed):
    """Routing where device 1 (experts 2, 3 on a 4-way axis) gets 3/4 of all pairs and expert 6
    none; combine weights random."""
    rng = np.random.default_rng(seed)
    idx = rng.choice([2, 3], size=(B, T, _X))
    idx[..., 1] = np.where(rng.random((B, T)) < 0.5, idx[..., 0] ^ 1, rng.choice([0, 1, 4, 5, 7],
                                                                                size=(B, T)))
    w = rng.random((B, T, _X)).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(idx, jnp.int32)


@pytest.fixture(scope="module")
def skewed_setup():
    weights, idx = _skewed(1)
    x = _randn(2, (B, T, _D))
    ws = (_randn(3, (_E, _D, _F), 0.5), _randn(4, (_E, _D, _F), 0.5), _randn(5, (_E, _F, _D), 0.5))
    cot = _randn(6, (B, T, _D))

    def loss(fn, x, weights, *ws):
        return jnp.sum(fn(x, weights, idx, *ws) * cot)
    dense = lambda x, w, *ws: dispatch.dense_dispatch(x, w, idx, *ws, jnp.float32)
    ref = jax.jit(jax.value_and_grad(lambda *a: loss(lambda x, w, i, *ws: dense(x, w, *ws), *a),
                                     argnums=range(5)))(x, weights, *ws)
    return x, weights, idx, ws, loss, ref


@pytest.mark.parametrize("transport", ["all_to_all", "ragged_all_to_all_emulated"])
def test_overflow_rounds_are_dropless_and_exact(skewed_setup, transport):
    x, weights, idx, ws, loss, (ref_loss, ref_grads) = skewed_setup
    mesh, rules = par.mesh_and_rules("fsdp_ep", {"fsdp": 2, "expert": 4})
    with par.sharding_context(mesh, rules):
        layout = routing.layout_from_context(get_config("tiny"))
        # 12 pairs per device, C = 8 rows per (source, destination) per round; device 1 receives
        # up to 12 from one source → 2 rounds.
        run = lambda x, w, i, *ws: dispatch.expert_parallel_moe(
            x, w, i, *ws, layout=layout, dtype=jnp.float32, transport=transport,
            buffer_factor=0.5)
        rounds = jax.jit(run)(x, weights, idx, *ws)[2]
        got_loss, got = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *b: run(*b)[0], *a),
                                                   argnums=range(5)))(x, weights, *ws)
    assert int(rounds) >= 2
    _close(got_loss, ref_loss, "loss")
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], got, ref_grads):
        _close(a, b, name)
    np.testing.assert_array_equal(np.asarray(got[2])[6], 0.0)     # expert 6 had no tokens


def test_overflow_on_one_fsdp_rank_only(skewed_setup):
    # The routed weights are split along D over fsdp and gathered inside every round, so the
    # two fsdp ranks meet in collectives inside the overflow loop. Skewed routing on fsdp
    # rank 0's sequences only (rows 0-3) and balanced on rank 1's would give them different
    # round counts: before they agreed on one, the step deadlocked (an abort on CPU).
    x, weights, idx, ws, loss, _ = skewed_setup
    balanced = (np.arange(B * T * _X).reshape(B, T, _X) % _E).astype(np.int32)
    idx = jnp.asarray(np.concatenate([np.asarray(idx)[:B // 2], balanced[B // 2:]]))
    mesh, rules = par.mesh_and_rules("fsdp_ep", {"fsdp": 2, "expert": 4})
    cot = _randn(6, (B, T, _D))

    def total(fn, x, w, *ws):
        return jnp.sum(fn(x, w, idx, *ws) * cot)
    dense = lambda x, w, i, *ws: dispatch.dense_dispatch(x, w, i, *ws, jnp.float32)
    ref_loss, ref = jax.jit(jax.value_and_grad(lambda *a: total(dense, *a),
                                               argnums=range(5)))(x, weights, *ws)
    with par.sharding_context(mesh, rules):
        layout = routing.layout_from_context(get_config("tiny"))
        run = lambda x, w, i, *ws: dispatch.expert_parallel_moe(
            x, w, i, *ws, layout=layout, dtype=jnp.float32, buffer_factor=0.5)
        rounds = jax.jit(run)(x, weights, idx, *ws)[2]
        got_loss, got = jax.jit(jax.value_and_grad(
            lambda *a: total(lambda *b: run(*b)[0], *a), argnums=range(5)))(x, weights, *ws)
    assert int(rounds) >= 2
    _close(got_loss, ref_loss, "loss")
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], got, ref):
        _close(a, b, name)


def test_worst_case_every_pair_on_one_device(skewed_setup):
    # Every slot of every token on expert 7 (the last device): M = 1·6·4 = 24 pairs per device
    # all go to one destination, C = 8, so R = ceil(M / C) = 3 rounds; nothing is dropped.
    x, _, _, ws, _, _ = skewed_setup
    idx = jnp.full((B, T, 4), 7, jnp.int32)
    weights = _randn(8, (B, T, 4))
    cot = _randn(9, (B, T, _D))
    mesh, rules = par.mesh_and_rules("fsdp_ep", {"fsdp": 1, "expert": 8})

    def loss(fn, x, *ws):
        y = fn(x, *ws)
        return jnp.sum(y * cot), y
    dense = lambda x, *ws: dispatch.dense_dispatch(x, weights, idx, *ws, jnp.float32)
    (_, ref), ref_g = jax.jit(jax.value_and_grad(lambda *a: loss(dense, *a), argnums=range(4),
                                                 has_aux=True))(x, *ws)
    with par.sharding_context(mesh, rules):
        layout = routing.layout_from_context(get_config("tiny"))
        run = lambda x, *ws: dispatch.expert_parallel_moe(x, weights, idx, *ws, layout=layout,
                                                         dtype=jnp.float32, buffer_factor=1.0)
        _, load, rounds = jax.jit(run)(x, *ws)
        (_, y), g = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *b: run(*b)[0], *a),
                                               argnums=range(4), has_aux=True))(x, *ws)
    assert int(rounds) == 3 and int(load[7]) == B * T * 4
    _close(y, ref, "y")
    for name, a, b in zip(["x", "w_gate", "w_up", "w_down"], g, ref_g):
        _close(a, b, name)


# --- capacity, node limit, errors ----------------------------------------------------------------

@pytest.mark.parametrize("preset,mesh_config", [("fsdp_ep", {"fsdp": 2, "expert": 4}),
                                                ("fsdp", {"fsdp": 8})])
def test_capacity_drops_the_same_pairs_with_and_without_ep(module_setup, preset, mesh_config):
    c, x, variables, _, _ = module_setup
    c = c.replace(moe_capacity_factor=1.0)

    def run(config):
        return jax.jit(lambda v, x: moe.MoE(config).apply(v, x, mutable=["moe_stats"]))(
            variables, x)
    y_dense, st_dense = run(c.replace(moe_impl="dense"))
    mesh, rules = par.mesh_and_rules(preset, mesh_config)
    with par.sharding_context(mesh, rules):
        y_ep, st_ep = run(c)
    _close(y_ep, y_dense, "y")
    dropped = float(st_ep["moe_stats"]["dropped"][0])
    assert dropped == float(st_dense["moe_stats"]["dropped"][0])
    # Independent count: per sequence, pairs past ceil(1.0·T·X/E) per expert, in token order.
    logits = jnp.einsum("BTD,DE->BTE", x, nn.unbox(variables["params"])["router"])
    _, idx, _ = routing.gate(logits, variables["routing"]["bias"], c)
    cap = int(np.ceil(T * c.n_experts_per_token / c.n_routed_experts))
    expect = 0
    for seq in np.asarray(idx):
        seen = {}
        for e in seq.reshape(-1):
            seen[e] = seen.get(e, 0) + 1
            expect += seen[e] > cap
    assert dropped == expect > 0


def test_tokens_reach_at_most_node_limit_devices():
    # 16 experts in 4 groups, 1 group kept, 4 experts per token; on 8 devices a group spans 2.
    c = get_config("tiny", n_routed_experts=16, n_expert_groups=4, n_limited_groups=1,
                   n_experts_per_token=4)
    assert dispatch.node_limit(c, 8) == 2
    _, idx, _ = jax.jit(routing.gate, static_argnums=2)(_randn(7, (512, 16)), None, c)
    devices_per_token = [len(set(row // 2)) for row in np.asarray(idx)]
    assert max(devices_per_token) <= 2
    free = c.replace(n_expert_groups=1, n_limited_groups=1)
    _, idx, _ = jax.jit(routing.gate, static_argnums=2)(_randn(7, (512, 16)), None, free)
    assert max(len(set(row // 2)) for row in np.asarray(idx)) > 2    # without the limit


def test_experts_not_divisible_by_expert_axis_is_a_clear_error():
    c = get_config("tiny", n_routed_experts=6, n_expert_groups=2, n_limited_groups=1)
    mesh, rules = par.mesh_and_rules("fsdp_ep", {"fsdp": 2, "expert": 4})
    x = jax.ShapeDtypeStruct((B, T, c.d_model), jnp.float32)
    variables = jax.eval_shape(moe.MoE(c).init, jax.random.key(0), x)
    with par.sharding_context(mesh, rules):
        with pytest.raises(MeshError, match=r"n_routed_experts=6 is not divisible by the "
                                            r"expert mesh axis expert=4.*one of 1, 2"):
            jax.eval_shape(moe.MoE(c).apply, variables, x)


def test_pretraining_preset_step_uses_the_ep_exchange(tiny):
    # The fsdp_ep preset's train step (what tests/parallel/test_sharded_parity.py runs against
    # the one-device losses) goes through the shard_map exchange.
    from deepseek_jax.train.optimizer import make_optimizer
    from deepseek_jax.train.step import init_train_state
    tx = make_optimizer(1e-3)
    mesh, rules = par.mesh_and_rules("fsdp_ep")
    step = sharded.make_sharded_train_step(tiny, tx, mesh, rules)
    state = jax.eval_shape(lambda: init_train_state(jax.random.key(0), tiny, tx))
    batch = {"tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
    assert "all-to-all" in step.lower(state, batch).as_text().replace("all_to_all", "all-to-all")
