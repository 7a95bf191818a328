"""fp8 under sharding: what the compiled step moves between devices, and that it computes the same.

  * the weight gathers and gradient scatters along an inner dimension equal JAX's own;
  * numerics (8 fake CPU devices): `fp8_dot` per device over the batch axes equals the one-device
    `fp8_dot`; `fp8_ragged_dot` on weight shards gathered in fp8 equals it on the whole weight;
  * collectives: no collective inside the fp8 GEMMs' loops over 128-blocks; under FSDP no
    all-reduce of a routed-expert weight's size in the MoE backward (bf16 and fp8);
  * bytes (a v5p 2x2x2 topology, compile only, through libtpu): the fp8 step all-gathers at most
    0.55× what the bf16 step does, under fsdp and fsdp_ep; under fsdp_ep the expert-parallel
    overflow rounds' gradient reductions stay inside their loop (bf16 and fp8).

Tolerances: the sharded and one-device computations multiply the same e4m3 codes by the same
scales; only the order of fp32 sums differs (per-device partial weight gradients summed across
devices). Values are O(1)–O(100) sums, so 1e-5 relative is far below an fp8 rounding (2⁻⁴).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax import parallel as par
from deepseek_jax.config import get_config
from deepseek_jax.kernels import fp8_linear
from deepseek_jax.kernels.fp8_linear import (all_gather_dim, fp8_dot, fp8_ragged_dot,
                                             psum_scatter_dim, stored_order)
from deepseek_jax.model import moe
from deepseek_jax.tools import hlo

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compile-only libtpu, shared host

RTOL = 1e-5
# A collective the SPMD partitioner put inside a reference GEMM's fori_loop over 128-blocks
# carries the op_name of the loop body it serves.
_BLOCK_LOOP = re.compile(r'op_name="[^"]*fp8_(?:matmul|dgrad|wgrad|gemm_nt)[^"]*/while/')


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(a, b, msg=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max(), err_msg=msg)


def _lines(text: str) -> dict[str, str]:
    return {m.group(1): line for line in text.splitlines()
            if (m := re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=", line))}


def _in_block_loops(text: str) -> list[str]:
    """Collectives of compiled HLO `text` that the partitioner put inside an fp8 block loop."""
    lines = _lines(text)
    return [c.name for c in hlo.collective_stats(text).collectives
            if _BLOCK_LOOP.search(lines.get(c.name, ""))]


def _all_reduces_of(text: str, n_elements: int) -> list[str]:
    """All-reduces of compiled HLO `text` whose result holds an array of `n_elements` values."""
    lines, found = _lines(text), []
    for c in hlo.collective_stats(text).collectives:
        shape = lines.get(c.name, "").split("=", 1)[-1].split(" all-reduce")[0]
        sizes = [np.prod([int(d) for d in dims.split(",") if d])
                 for dims in re.findall(r"[a-z][a-z0-9]*\[([0-9,]*)\]", shape)]
        if c.kind == "all-reduce" and n_elements in sizes:
            found.append(f"{c.name}: {shape.strip()}")
    return found


# --- numerics ------------------------------------------------------------------------------------

def test_fp8_dot_per_device_equals_one_device():
    # 8 devices × 128 rows: each device's 1×128 token tiles are the one-device tiles, so the
    # wgrad multiplies the same codes; only the cross-device sum of dw is reordered.
    mesh, rules = par.mesh_and_rules("fsdp", {"fsdp": 8})
    m, k, n = 8 * 128, 1024, 256
    x, w, cot = _randn(0, (m, k)), _randn(1, (k, n), 0.05), _randn(2, (m, n))

    def loss(x, w, axes):
        return jnp.sum(fp8_dot(x, w, token_axes=axes) * cot)

    grad = lambda axes: jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, axes), (0, 1)))
    ref, (rdx, rdw) = grad(())(x, w)
    with par.sharding_context(mesh, rules):
        xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
        ws = jax.device_put(w, NamedSharding(mesh, P("fsdp")))
        fn = grad(("fsdp",))
        text = fn.lower(xs, ws).compile().as_text()
        got, (dx, dw) = fn(xs, ws)
    _close(got, ref, "loss")
    _close(dx, rdx, "dx")
    _close(dw, rdw, "dw")
    assert _in_block_loops(text) == []


@pytest.mark.parametrize("dim", [1, 2])
def test_fp8_ragged_dot_on_gathered_shards_equals_whole_weight(dim):
    # Inside a shard_map over 8 devices, each with its own rows: w split along K (dim 1) or N
    # (dim 2) into 128-wide shards, gathered quantized. Reference: every device's rows through
    # the whole weight, weight gradients summed over the devices.
    mesh, _ = par.mesh_and_rules("fsdp", {"fsdp": 8})
    E, m, k, n = 4, 64, 1024, 1024
    rows, w, cot = _randn(3, (8 * m, k)), _randn(4, (E, k, n), 0.05), _randn(5, (8 * m, n))
    sizes = np.random.default_rng(6).multinomial(m, [1 / E] * E, size=8).astype(np.int32)
    sizes = jnp.asarray(sizes.reshape(-1))                                  # [8·E]
    w_spec = P(None, "fsdp", None) if dim == 1 else P(None, None, "fsdp")

    def sharded(rows, w):
        body = lambda r, w, s: fp8_ragged_dot(r, w, s, gather=(("fsdp",), dim))
        f = jax.shard_map(body, mesh=mesh, in_specs=(P("fsdp"), w_spec, P("fsdp")),
                          out_specs=P("fsdp"), check_vma=False)
        return jnp.sum(f(rows, w, sizes) * cot)

    def reference(rows, w):
        ys = [fp8_ragged_dot(rows[d * m:(d + 1) * m], w, sizes[d * E:(d + 1) * E])
              for d in range(8)]
        return jnp.sum(jnp.concatenate(ys) * cot)

    ref, (rdr, rdw) = jax.jit(jax.value_and_grad(reference, (0, 1)))(rows, w)
    got, (dr, dw) = jax.jit(jax.value_and_grad(sharded, (0, 1)))(rows, w)
    _close(got, ref, "loss")
    _close(dr, rdr, "d rows")
    _close(dw, rdw, "dw")


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (2, 0, 1)])
@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("axes", [("b",), ("a", "b")])
def test_gather_and_scatter_along_a_dim_equal_jax_tiled_collectives(dim, axes, order,
                                                                     monkeypatch):
    # all_gather_dim / psum_scatter_dim move data in their own order (the shard index as a
    # leading axis, the axes in the shard's stored order: here each order a TPU lays expert
    # shards out in); what each device ends with must be JAX's tiled all_gather / psum_scatter
    # along `dim`, exactly: the values are small integers, so every sum is exact in any order
    # (every device holds the same array, and each of its elements sums to n times itself).
    # The gather's autodiff transpose is the scatter.
    monkeypatch.setattr(fp8_linear, "stored_order", lambda shape, dtype: order)
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    n = 4 if axes == ("b",) else 8
    spec = P(*[axes if i == dim else None for i in range(3)])
    shape = [8 * (n if i == dim else 1) for i in range(3)]
    whole = jnp.asarray(np.random.default_rng(1).integers(-8, 9, shape), jnp.float32)
    shards = jax.device_put(whole, NamedSharding(mesh, spec))
    per_device = lambda f, i, o: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=i, out_specs=o,
                                                       check_vma=False))
    gathered = per_device(lambda w: all_gather_dim(w, axes, dim), spec, P())(shards)
    np.testing.assert_array_equal(gathered, whole)
    ours = per_device(lambda u: psum_scatter_dim(u, axes, dim), P(), spec)(whole)
    jaxs = per_device(lambda u: jax.lax.psum_scatter(u, axes, scatter_dimension=dim, tiled=True),
                      P(), spec)(whole)
    np.testing.assert_array_equal(ours, jaxs)
    np.testing.assert_array_equal(ours, n * whole)
    grad = jax.grad(lambda w, c: jnp.sum(all_gather_dim(w, axes, dim) * c))
    np.testing.assert_array_equal(
        per_device(grad, (spec, P()), spec)(shards, whole), jaxs)


def test_stored_order_is_the_targets_default_layout():
    # Row-major on this host; on a TPU, libtpu stores a shard whose last dimension does not fill
    # its 128 lanes with that dimension moved off the minor position (V3's w_down shard under
    # FSDP over 64 chips, [E, F, D/64] = [32, 2048, 112], is stored F-minor).
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    assert stored_order((32, 2048, 112), jnp.float32) == (0, 1, 2)
    tpus = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    with jax.set_mesh(jax.sharding.Mesh(np.array(tpus), ("x",))):
        assert stored_order((32, 2048, 112), jnp.float32) == (0, 2, 1)
        assert stored_order((32, 2048, 112), jnp.bfloat16) == (0, 2, 1)
        assert stored_order((32, 112, 2048), jnp.float32) == (0, 1, 2)
        assert stored_order((32, 2048, 128), jnp.float32) == (0, 1, 2)


# --- collectives of the MoE layer under FSDP ------------------------------------------------------

@pytest.mark.parametrize("fp8,d_model", [(False, 512), (True, 512), (True, 256)])
def test_fsdp_moe_backward_reduce_scatters_expert_gradients(fp8, d_model):
    # d_model 512 over fsdp = 4: 128 per shard, so fp8 gathers quantized shards (fp8=True) and
    # bf16 gathers bf16 ones; both must send the expert gradients back as reduce-scatters.
    # d_model 256: 64 per shard, less than one 128-block, so fp8 gathers the stored shards and
    # quantizes whole blocks after; the gradients must leave as reduce-scatters all the same
    # (the weights had entered the MoE whole, [E, D, F] fp32 gathered per layer: V3's experts
    # on fsdp = 256, with 28 rows of D per shard).
    c = get_config("tiny", d_model=d_model, dtype=jnp.bfloat16, fp8=fp8)
    E, D, F = c.n_routed_experts, c.d_model, c.moe_d_ff
    x = _randn(7, (8, 6, D))
    variables = jax.jit(moe.MoE(c).init)(jax.random.key(0), x)

    def loss(params, x):
        y, _ = moe.MoE(c).apply({**variables, "params": params}, x, mutable=["moe_stats"])
        return jnp.sum(y.astype(jnp.float32) ** 2)

    mesh, rules = par.mesh_and_rules("fsdp", {"data": 2, "fsdp": 4})
    with par.sharding_context(mesh, rules):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        text = jax.jit(jax.grad(loss)).lower(variables["params"], xs).compile().as_text()
    # Before: the shard_map took the gathered weights, so its transpose all-reduced
    # [E, D, F]-sized gradients over fsdp. Now the data-parallel sum of one fsdp shard
    # ([E, D/4, F]) is the largest expert-gradient all-reduce.
    assert _all_reduces_of(text, E * D * F) == []
    stats = hlo.collective_stats(text)
    assert any(c.kind == "reduce-scatter" and c.bytes >= E * D * F for c in stats.collectives)
    assert _in_block_loops(text) == []


def test_fp8_experts_chunked_on_sub_block_shards():
    """fsdp = 4 with d_model 256 (64 rows of D per shard, less than a 128-block): the experts,
    gathered as stored and quantized whole after, give the one-device model's output (the same
    e4m3 codes and scales; the forward's fp8 GEMMs quantize rows per token, whatever the
    sharding), and gathered 2 chunks at a time the same values and gradients as all at once
    on the same mesh (each device's rows and wgrad tiles are the same; a one-device wgrad
    tiles other rows together, so it differs by fp8 rounding). Agreement up to the order of
    fp32 sums (RTOL above)."""
    c = get_config("tiny", d_model=256, fp8=True, moe_impl="ragged")
    x = _randn(8, (8, 6, c.d_model))
    variables = jax.jit(moe.MoE(c).init)(jax.random.key(0), x)

    def loss(config, params, x):
        y, _ = moe.MoE(config).apply({**variables, "params": params}, x, mutable=["moe_stats"])
        return jnp.sum(y ** 2), y

    grad = lambda config: jax.jit(jax.value_and_grad(lambda p, x: loss(config, p, x),
                                                     has_aux=True))
    (_, one_y), _ = grad(c)(variables["params"], x)
    mesh, rules = par.mesh_and_rules("fsdp", {"data": 2, "fsdp": 4})
    with par.sharding_context(mesh, rules):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        (_, whole_y), whole = grad(c.replace(moe_expert_chunks=1))(variables["params"], xs)
        (_, y), got = grad(c.replace(moe_expert_chunks=2))(variables["params"], xs)
    _close(whole_y, one_y, "y, all experts at once, against one device")
    _close(y, whole_y, "y, chunked")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(whole)):
        _close(a, b, jax.tree_util.keystr(path))


# --- bytes of the compiled train step on a TPU topology (compile only) ----------------------------

# Widths that make every fp8 weight's shards whole 128-blocks on 8 devices (D = 8·128), and
# make the fp8 projections most of what FSDP gathers (small vocabulary).
_SMALL = dict(vocab_size=64, d_model=1024, n_layers=3, n_dense_layers=1, d_ff=512, n_heads=4,
              q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
              v_head_dim=32, n_routed_experts=8, n_shared_experts=1, n_experts_per_token=2,
              moe_d_ff=256, n_expert_groups=1, n_limited_groups=1, mtp_depth=0,
              dtype=jnp.bfloat16)


_MESHES = {"fsdp": {"fsdp": 8}, "fsdp_ep": {"fsdp": 2, "expert": 4}}


@pytest.fixture(scope="module")
def small_step():
    """`small_step(preset, fp8)`: the compiled train step of `_SMALL` on a v5p 2x2x2 topology
    (compile only), each compiled once for the module."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    from deepseek_jax.tools.compile import Strategy, compile_strategy
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    done = {}

    def compiled(preset: str, fp8: bool) -> dict:
        if (preset, fp8) not in done:
            c = get_config("tiny", **_SMALL, fp8=fp8)
            done[preset, fp8] = compile_strategy(c, Strategy.make(preset, _MESHES[preset]),
                                                 devices, 8, 128, keep_hlo=True)
        return done[preset, fp8]
    return compiled


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_ep"])
def test_fp8_step_gathers_fp8_once_on_tpu(small_step, preset):
    gathered = {}
    for fp8 in (False, True):
        r = small_step(preset, fp8)
        stats = r["collectives"]
        # The loops of unknown trip count allowed: the expert-parallel overflow rounds (forward
        # and backward), which run only when routing overflows the buffer.
        assert len(stats.unknown_loops) <= (2 if preset == "fsdp_ep" else 0)
        # Bytes of a balanced step: the expert-parallel overflow rounds (loops of unknown trip
        # count) do not run; each overflow round that does run gathers the fp8 expert weights
        # again (bf16 gathers them once per layer), which this comparison leaves out.
        gathered[fp8] = stats.bytes_by_role(skip_unknown_loops=True)["all-gather"]
        # Nothing the partitioner wrote runs inside a GEMM's loop over 128-blocks: every
        # collective runs at most once per layer of its scanned stack (2 MoE layers).
        assert _in_block_loops(r["hlo"]) == []
        assert max(c.executions for c in stats.collectives) <= 2
        # The dense fp8 GEMMs are the Pallas TPU kernel, run per shard: the layers' shard_map
        # over the batch axes covers the whole mesh under both presets (before: XLA's reference
        # GEMM under any mesh of several devices).
        assert ("fp8_gemm_nt" in r["hlo"]) == fp8
    # Before: 2.6× the bf16 bytes (fsdp), from gathers inside the block loops.
    assert gathered[True] <= 0.55 * gathered[False], gathered


@pytest.mark.parametrize("fp8", [False, True])
def test_expert_parallel_overflow_reductions_stay_in_their_loop(small_step, fp8):
    # fsdp_ep (fsdp = 2, expert = 4): each device holds 2 of the 8 experts, split along D over
    # fsdp. A balanced step reduce-scatters each routed weight's gradient once per MoE layer
    # (round 0: gate, up, down); the overflow rounds' reductions belong in their loop, which
    # runs only when routing overflows the buffer. Before, XLA moved the bf16 ones after the
    # loop (a reduction of an accumulated loop value): every step ran them, on loop carries of
    # the gathered weights' size (V3 under EP8: 3 × 0.88 GiB live at the memory peak, and the
    # gradients all-reduced whole).
    r = small_step("fsdp_ep", fp8)
    c, mesh = _SMALL, _MESHES["fsdp_ep"]
    shard = (c["n_routed_experts"] // mesh["expert"]) * (c["d_model"] // mesh["fsdp"]) \
        * c["moe_d_ff"]
    shard_bytes = shard * (4 if fp8 else 2)          # fp8's weight gradients are fp32
    stats = r["collectives"].collectives
    # (By kind: an all-reduce combining several gradients can hold an element of this size that
    # is no expert's, e.g. the attention's bf16[1024, 4, 64].)
    outside = [x.name for x in stats if x.kind == "reduce-scatter"
               and x.result_bytes == shard_bytes and not x.in_unknown_loop]
    inside = [x.name for x in stats if x.kind == "reduce-scatter"
              and x.result_bytes == shard_bytes and x.in_unknown_loop]
    assert len(outside) == 3, outside
    assert len(inside) == 3, inside
