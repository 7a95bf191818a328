"""HLO collective parsing: hand-written HLO with known answers, and compiled programs (8 fake CPU
devices, and a TPU topology through libtpu) whose collective bytes are known by construction."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.tools import hlo

# Another process on the host may hold libtpu's TPU lock; compile-only use does not need it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# A program in the shape XLA prints after SPMD partitioning: a combined (tuple) all-reduce, an
# async all-gather pair, a reduce-scatter, an all-to-all, a permute, and a while loop (trip count
# 4 from the backend config) whose body runs an all-gather.
PROGRAM = """HloModule jit_step, entry_computation_layout={()->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[2,8])) -> (s32[], f32[2,8]) {
  %p = (s32[], f32[2,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[2,8]{1,0} get-tuple-element(%p), index=1
  %ag = f32[8,8]{1,0} all-gather(%w), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %s = f32[2,8]{1,0} slice(%ag), slice={[0:2], [0:8]}
  ROOT %t = (s32[], f32[2,8]{1,0}) tuple(%i, %s)
}

%cond (q: (s32[], f32[2,8])) -> pred[] {
  %q = (s32[], f32[2,8]{1,0}) parameter(0)
  %n = s32[] constant(4)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[1024], b: bf16[16,4], c: f32[2,8]) -> f32[] {
  %a = f32[1024]{0} parameter(0)
  %b = bf16[16,4]{1,0} parameter(1)
  %c = f32[2,8]{1,0} parameter(2)
  %ar = (f32[1024]{0}, bf16[16,4]{1,0}) all-reduce(f32[1024]{0} %a, bf16[16,4]{1,0} %b), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %ags = (bf16[16,4]{1,0}, bf16[64,4]{1,0}) all-gather-start(bf16[16,4]{1,0} %b), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %agd = bf16[64,4]{1,0} all-gather-done((bf16[16,4]{1,0}, bf16[64,4]{1,0}) %ags)
  %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %a), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %a2a = bf16[16,4]{1,0} all-to-all(bf16[16,4]{1,0} %b), channel_id=4, replica_groups=[4,2]<=[8], dimensions={0}
  %cp = f32[1024]{0} collective-permute(f32[1024]{0} %a), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %zero = s32[] constant(0)
  %init = (s32[], f32[2,8]{1,0}) tuple(%zero, %c)
  %loop = (s32[], f32[2,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %r = f32[] constant(0)
}
"""


def test_shape_bytes_sums_tuples_and_ignores_layouts():
    assert hlo.shape_bytes("f32[1024]{0}") == 4096
    assert hlo.shape_bytes("(f32[1024]{0}, bf16[16,4]{1,0})") == 4096 + 128
    assert hlo.shape_bytes("bf16[1,256,256]{2,1,0:T(8,128)(2,1)S(1)}") == 2 * 256 * 256
    assert hlo.shape_bytes("f32[]") == 4
    assert hlo.shape_bytes("(s32[], /*index=1*/u32[]{:S(2)})") == 8


def test_known_program():
    stats = hlo.collective_stats(PROGRAM)
    by = stats.by_kind()
    # Combined all-reduce: both tuple elements, once.
    assert by["all-reduce"] == {"count": 1, "executions": 1, "bytes": 4096 + 128}
    # The async pair counts once (at the done: 64×4 bf16 output); the loop's gather runs 4 times.
    assert by["all-gather"]["count"] == 2
    assert by["all-gather"]["executions"] == 1 + 4
    assert by["all-gather"]["bytes"] == 64 * 4 * 2 + 4 * (8 * 8 * 4)
    # Reduce-scatter: the unreduced input (256 floats × group of 4).
    assert by["reduce-scatter"]["bytes"] == 256 * 4 * 4
    assert by["all-to-all"]["bytes"] == 128
    assert by["collective-permute"]["bytes"] == 4096
    groups = {c.name: c.group_size for c in stats.collectives}
    assert groups == {"ar": 8, "agd": 4, "rs": 4, "a2a": 2, "cp": 2, "ag": 4}
    assert stats.unknown_loops == []


def test_trip_count_from_condition_constant_and_channel_dedup():
    # TPU style: no known_trip_count; the condition compares with constant(4). The same channel
    # cloned into two fusions (async start and done) counts once.
    text = PROGRAM.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    text = text.replace("ENTRY %main", "%fused_dup (d: f32[1024]) -> f32[1024] {\n"
                        "  %d = f32[1024]{0} parameter(0)\n"
                        "  ROOT %dup = f32[1024]{0} collective-permute(f32[1024]{0} %d), "
                        "channel_id=5, source_target_pairs={{0,1},{1,0}}\n}\n\nENTRY %main")
    text = text.replace("  ROOT %r = f32[] constant(0)",
                        "  %f = f32[1024]{0} fusion(%a), kind=kLoop, calls=%fused_dup\n"
                        "  ROOT %r = f32[] constant(0)")
    by = hlo.collective_stats(text).by_kind()
    assert by["all-gather"]["executions"] == 5
    assert by["collective-permute"]["count"] == 1


def test_same_channel_in_one_computation_counts_each():
    # JAX lowers explicit shard_map collectives with channel_id=1: two all-gathers of the same
    # shape in one computation are two collectives, not one cloned into async fusions.
    text = PROGRAM.replace(
        "  ROOT %r = f32[] constant(0)",
        "  %g1 = bf16[64,4]{1,0} all-gather(%b), channel_id=1, replica_groups=[2,4]<=[8], "
        "dimensions={0}\n  %g2 = bf16[64,4]{1,0} all-gather(%b), channel_id=1, "
        "replica_groups=[2,4]<=[8], dimensions={0}\n  ROOT %r = f32[] constant(0)")
    by = hlo.collective_stats(text).by_kind()
    assert by["all-gather"]["count"] == 2 + 2
    assert by["all-gather"]["bytes"] == 64 * 4 * 2 * 3 + 4 * (8 * 8 * 4)


def test_unknown_trip_count_is_reported():
    text = PROGRAM.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    text = text.replace("  %n = s32[] constant(4)\n", "").replace("compare(%j, %n)", "compare(%j, %j)")
    stats = hlo.collective_stats(text)
    assert stats.unknown_loops == ["loop"]
    assert stats.by_kind()["all-gather"]["executions"] == 2
    # The loop's all-gather (8·8 floats) is flagged; a balanced step leaves it out.
    assert [c.name for c in stats.collectives if c.in_unknown_loop] == ["ag"]
    every, balanced = stats.bytes_by_role(), stats.bytes_by_role(skip_unknown_loops=True)
    assert every["all-gather"] - balanced["all-gather"] == 8 * 8 * 4


def test_compiled_program_on_eight_devices():
    """A scanned, FSDP-sharded matmul: the compiler's own HLO, counted per step."""
    L, D = 3, 64
    stats = hlo.collective_stats(_fsdp_scan_grad(jax.devices()[:8], L, D, 16, jnp.float32))
    by = stats.by_kind()
    assert stats.unknown_loops == []
    # Every layer's weight is gathered whole (D·D fp32) in the forward loop and again in the
    # backward loop: 2·L gathers of 16 KiB.
    assert by["all-gather"]["executions"] == 2 * L
    assert by["all-gather"]["bytes"] == 2 * L * D * D * 4
    # Each layer's weight gradient is reduced over the 8 batch shards (all-reduce or
    # reduce-scatter, as the compiler chooses): L arrays of D·D fp32 in total.
    reduced = sum(by.get(k, {}).get("bytes", 0) for k in ("all-reduce", "reduce-scatter"))
    assert reduced == L * D * D * 4


@pytest.mark.parametrize("n,expected", [(0, "0 B"), (1536, "1.5 KiB"), (3 * 2 ** 30, "3.0 GiB")])
def test_format_bytes(n, expected):
    assert hlo.format_bytes(n) == expected


def test_counter_start_and_step_set_the_trip_count():
    """TPU style: the loop counts from 1 in steps of 2 below 8 → 4 iterations."""
    text = PROGRAM.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
    text = text.replace("%n = s32[] constant(4)", "%n = s32[] constant(8)")
    text = text.replace("%zero = s32[] constant(0)", "%zero = s32[] constant(1)")
    text = text.replace("  ROOT %t = (s32[], f32[2,8]{1,0}) tuple(%i, %s)",
                        "  %two = s32[] constant(2)\n  %next = s32[] add(%i, %two)\n"
                        "  ROOT %t = (s32[], f32[2,8]{1,0}) tuple(%next, %s)")
    by = hlo.collective_stats(text).by_kind()
    assert by["all-gather"]["executions"] == 1 + 4


def test_permute_group_is_its_ring():
    stats = hlo.collective_stats(PROGRAM.replace("source_target_pairs={{0,1},{1,0}}",
                                                 "source_target_pairs={{0,1},{1,2},{2,3},{3,0}}"))
    assert {c.name: c.group_size for c in stats.collectives}["cp"] == 4


# Collectives written by hand inside loops: per device x is f32[R, 1024] (R rows of the global
# [8R, 1024] array). Each of 5 scan steps runs a fori_loop of 3 steps (psum + ring ppermute of
# x), then all-gathers x and reduce-scatters the gathered array.
R, COLS, OUTER, INNER = 1024, 1024, 5, 3
X_BYTES = R * COLS * 4


def _known_program(devices):
    mesh = Mesh(np.array(devices), ("i",))
    ring = [(k, (k + 1) % 8) for k in range(8)]

    def per_device(x):
        def inner(_, c):
            c = c + jax.lax.psum(c, "i")
            return jax.lax.ppermute(c, "i", perm=ring)

        def outer(c, _):
            c = jax.lax.fori_loop(0, INNER, inner, c)
            g = jax.lax.all_gather(c, "i", tiled=True)                       # [8R, COLS]
            return c + jax.lax.psum_scatter(2 * g, "i", scatter_dimension=0, tiled=True), None

        return jax.lax.scan(outer, x, None, length=OUTER)[0]

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("i"), out_specs=P("i")))
    x = jax.ShapeDtypeStruct((8 * R, COLS), jnp.float32, sharding=NamedSharding(mesh, P("i")))
    return hlo.collective_stats(f.lower(x).compile().as_text())


EXPECTED = {"all-reduce": OUTER * INNER * X_BYTES,          # psum of x, 15 times
            "collective-permute": OUTER * INNER * X_BYTES,  # ring shift of x, 15 times
            "all-gather": OUTER * 8 * X_BYTES,              # the gathered [8R, COLS], 5 times
            "reduce-scatter": OUTER * 8 * X_BYTES}          # its unreduced input, 5 times


def test_hand_written_collectives_in_nested_loops_on_cpu():
    stats = _known_program(jax.devices()[:8])
    assert stats.unknown_loops == []
    assert stats.bytes_by_kind() == EXPECTED
    assert stats.bytes_by_role() == EXPECTED
    by = stats.by_kind()
    assert by["all-reduce"]["executions"] == OUTER * INNER
    assert by["all-gather"]["executions"] == OUTER
    assert all(c.group_size == 8 for c in stats.collectives)


def _tpu_devices(topology):
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def test_hand_written_collectives_in_nested_loops_on_tpu():
    """The same program compiled for a v5p 2x2x2 slice: loop trip counts come from the loop
    itself (no known_trip_count on TPU), and the compiler writes the reduce-scatter as an
    all-reduce of the whole array whose users keep one shard (role reduce-scatter)."""
    stats = _known_program(_tpu_devices("v5p:2x2x2"))
    assert stats.unknown_loops == []
    assert stats.bytes_by_role() == EXPECTED
    kinds = stats.bytes_by_kind()
    assert kinds["all-gather"] == EXPECTED["all-gather"]
    assert kinds["collective-permute"] == EXPECTED["collective-permute"]
    assert (kinds.get("reduce-scatter", 0) + kinds["all-reduce"]
            == EXPECTED["reduce-scatter"] + EXPECTED["all-reduce"])


def test_all_gather_written_as_all_reduce_counts_as_a_gather():
    """Over all 64 chips of a v5p 4x4x4 without wraparound links (libtpu's default for the
    name; `targets.Target.wrap` gives the slice its links) and in plain device order, libtpu
    compiles an all-gather as an all-reduce of a zero buffer holding each shard. Its role is
    all-gather, with the gathered array's bytes."""
    devices = _tpu_devices("v5p:4x4x4")
    mesh = Mesh(np.array(devices), ("x",))
    fn = jax.jit(jax.shard_map(lambda w: 2 * jax.lax.all_gather(w, "x", axis=0, tiled=True),
                               mesh=mesh, in_specs=P("x"), out_specs=P(), check_vma=False))
    text = fn.lower(jax.ShapeDtypeStruct((64 * 8, 256, 512), jnp.bfloat16,
                                         sharding=NamedSharding(mesh, P("x")))) \
        .compile().as_text()
    stats = hlo.collective_stats(text)
    whole = 64 * 8 * 256 * 512 * 2
    assert stats.bytes_by_kind() == {"all-reduce": whole}       # what libtpu wrote
    assert stats.bytes_by_role() == {"all-gather": whole}


def test_windowed_einsum_permutes_count_as_the_gathers_they_replace():
    """An FSDP matmul large enough for the TPU compiler's windowed einsum (v5p 2x2x2, bf16
    weights [L, D, D] split over 8 devices): no all-gather or reduce-scatter op is left, only
    collective-permutes in `windowed_dot_general_body_ag/_rs` loops, one shard per step. By
    role they are the L forward and L backward weight gathers and the L gradient
    reduce-scatters; a bidirectional window moves 9 shards of the 8 (one extra)."""
    L, D, B = 3, 8192, 8192
    stats = hlo.collective_stats(_fsdp_scan_grad(_tpu_devices("v5p:2x2x2"), L, D, B,
                                                 jnp.bfloat16))
    assert stats.unknown_loops == []
    assert set(stats.bytes_by_kind()) == {"collective-permute"}
    weight = D * D * 2
    roles = stats.bytes_by_role()
    assert roles == {"all-gather": 2 * L * weight * 9 // 8,
                     "reduce-scatter": L * weight * 9 // 8}
    assert all(c.group_size == 8 for c in stats.collectives)


def _fsdp_scan_grad(devices, L, D, B, dtype) -> str:
    """Compiled HLO text of the gradient of a scan over L layers h ← tanh(h·w_l), the weights
    [L, D, D] split over one mesh axis along their input dim (FSDP) and the batch [B, D] too."""
    mesh = Mesh(np.array(devices), ("x",))

    def f(w, x):
        def body(h, wl):
            return jnp.tanh(h @ wl), None
        return jax.lax.scan(body, x, w)[0].sum()

    step = jax.jit(jax.grad(f), in_shardings=(NamedSharding(mesh, P(None, "x", None)),
                                              NamedSharding(mesh, P("x", None))),
                   out_shardings=NamedSharding(mesh, P(None, "x", None)))
    return step.lower(jax.ShapeDtypeStruct((L, D, D), dtype),
                      jax.ShapeDtypeStruct((B, D), dtype)).compile().as_text()


def test_collective_offloaded_to_sparsecore_runs_with_its_caller():
    # TPU7x offloads collectives to its SparseCores: an async `call-start` in the loop body whose
    # `to_apply=` computation holds a combined all-reduce. Before, the call was not followed and
    # the all-reduce counted once instead of once per iteration.
    offload = """%offload (o: f32[2,8]) -> (f32[2,8]) {
  %o = f32[2,8]{1,0} parameter(0)
  ROOT %ar9 = (f32[2,8]{1,0}) all-reduce(%o), channel_id=9, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
}, execution_thread="sparsecore"

"""
    call = ('  %cs = ((), (), s32[]{:S(2)}) call-start(), async_execution_thread="sparsecore", '
            'to_apply=%offload\n  %cd = (f32[2,8]{1,0}) call-done(%cs)\n')
    text = PROGRAM.replace("%body (p:", offload + "%body (p:")
    text = text.replace("  %s = f32[2,8]{1,0} slice(%ag)", call + "  %s = f32[2,8]{1,0} slice(%ag)")
    by = hlo.collective_stats(text).by_kind()
    assert by["all-reduce"]["count"] == 2
    assert by["all-reduce"]["executions"] == 1 + 4
    assert by["all-reduce"]["bytes"] == 4096 + 128 + 4 * (2 * 8 * 4)


# A SparseCore offload as libtpu writes it after scheduling: `call-start()` takes no operands, a
# `call-update(start, args...)` binds the called computation's parameters, `call-done` returns
# its result. One combined all-reduce of three elements: a zero buffer holding this device's
# shard (a gather), a gradient whose only reader is a fusion slicing out one shard of it (a
# reduce-scatter), and an array used whole (an all-reduce).
OFFLOADED_TUPLE = """HloModule jit_step, entry_computation_layout={()->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%offload (p0: bf16[8,64], p1: f32[8,16], p2: f32[4]) -> (bf16[8,64], f32[8,16], f32[4]) {
  %p0 = bf16[8,64]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %p2 = f32[4]{0} parameter(2)
  ROOT %ar = (bf16[8,64]{1,0}, f32[8,16]{1,0}, f32[4]{0}) all-reduce(%p0, %p1, %p2), channel_id=3, replica_groups=mesh['axis_0'=8] {'axis_0'}, use_global_device_ids=true, to_apply=%add
}, execution_thread="sparsecore"

%keep_shard (g: f32[8,16], i: s32[]) -> f32[1,16] {
  %g = f32[8,16]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,16]{1,0} dynamic-slice(%g, %i, %z), dynamic_slice_sizes={1,16}
}

ENTRY %main (w: bf16[1,64], grad: f32[8,16], n: f32[4], i: s32[]) -> f32[] {
  %w = bf16[1,64]{1,0} parameter(0)
  %grad = f32[8,16]{1,0} parameter(1)
  %n = f32[4]{0} parameter(2)
  %i = s32[] parameter(3)
  %cs = ((), (), s32[]{:S(2)}) call-start(), async_execution_thread="sparsecore", to_apply=%offload
  %zeros = bf16[8,64]{1,0} broadcast(bf16[] constant(0)), dimensions={}
  %z = s32[] constant(0)
  %buffer = bf16[8,64]{1,0} dynamic-update-slice(%zeros, %w, %i, %z)
  %copy-start = (bf16[8,64]{1,0}, bf16[8,64]{1,0}, u32[]) copy-start(%buffer)
  %copy-done = bf16[8,64]{1,0} copy-done(%copy-start)
  %cu = ((bf16[8,64]{1,0}, f32[8,16]{1,0}, f32[4]{0}), (bf16[8,64]{1,0}, f32[8,16]{1,0}, f32[4]{0})) call-update(%cs, %copy-done, %grad, %n)
  %cd = (bf16[8,64]{1,0}, f32[8,16]{1,0}, f32[4]{0}) call-done(%cu)
  %gathered = bf16[8,64]{1,0} get-tuple-element(%cd), index=0
  %summed = f32[8,16]{1,0} get-tuple-element(%cd), index=1
  %whole = f32[4]{0} get-tuple-element(%cd), index=2
  %bc = f32[8,16]{1,0} bitcast(%summed)
  %mine = f32[1,16]{1,0} fusion(%bc, %i), kind=kLoop, calls=%keep_shard
  %twice = f32[4]{0} add(%whole, %whole)
  ROOT %r = f32[] constant(0)
}
"""


def test_offloaded_combined_all_reduce_is_split_by_what_each_element_does():
    stats = hlo.collective_stats(OFFLOADED_TUPLE)
    assert stats.bytes_by_kind() == {"all-reduce": 8 * 64 * 2 + 8 * 16 * 4 + 4 * 4}
    assert stats.bytes_by_role() == {"all-gather": 8 * 64 * 2, "reduce-scatter": 8 * 16 * 4,
                                     "all-reduce": 4 * 4}
    assert sorted((c.name, c.role) for c in stats.collectives) == [
        ("ar", "all-gather"), ("ar", "all-reduce"), ("ar", "reduce-scatter")]
    # A fusion that reads more than one shard is not a reduce-scatter.
    wider = OFFLOADED_TUPLE.replace("f32[1,16]", "f32[2,16]").replace("sizes={1,16}",
                                                                      "sizes={2,16}")
    assert hlo.collective_stats(wider).bytes_by_role()["all-reduce"] == 8 * 16 * 4 + 4 * 4


def test_weight_gathers_offloaded_as_all_reduces_count_as_gathers_on_tpu7x():
    """On a TPU7x slice of 128 devices (tpu7x:4x4x4) libtpu offloads each FSDP weight gather to
    the SparseCores as an all-reduce of a zero buffer holding this device's shard (there is no
    all-gather op left). The same scan as the windowed-einsum test, at a size that is not
    windowed: by role, L forward and L backward weight gathers and L gradient reduce-scatters."""
    L, D, B = 3, 2048, 2048
    stats = hlo.collective_stats(_fsdp_scan_grad(_tpu_devices("tpu7x:4x4x4"), L, D, B,
                                                 jnp.bfloat16))
    weight = D * D * 2
    assert stats.unknown_loops == []
    assert stats.bytes_by_kind()["all-reduce"] == 2 * L * weight     # what libtpu wrote
    assert stats.bytes_by_role() == {"all-gather": 2 * L * weight,
                                     "reduce-scatter": L * weight}


# Two shapes libtpu's fusions give the roles above (seen in the 512-chip FSDP step below): a
# gradient's shard sliced out and cast to f32 in one fusion XLA names after the slice (more
# bytes than the bf16 shard, the same number of values), and zero buffers holding this
# device's shard built inside a fusion, alone or as one output of a multi-output fusion,
# neither named after the update.
FUSED_ROLES = """HloModule jit_step, entry_computation_layout={()->f32[]}

%add (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%x, %y)
}

%shard_as_f32 (g: bf16[8,16], i: s32[]) -> f32[1,16] {
  %g = bf16[8,16]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,16]{1,0} dynamic-slice(%g, %i, %z), dynamic_slice_sizes={1,16}
  ROOT %f = f32[1,16]{1,0} convert(%ds)
}

%place (buf: bf16[8,32], w: bf16[1,32], i: s32[]) -> bf16[8,32] {
  %buf = bf16[8,32]{1,0} parameter(0)
  %w = bf16[1,32]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = bf16[8,32]{1,0} dynamic-update-slice(%buf, %w, %i, %z)
}

%carry_and_place (c: f32[4], buf: bf16[8,64], w: bf16[1,64], i: s32[]) -> (f32[4], bf16[8,64]) {
  %c = f32[4]{0} parameter(0)
  %buf = bf16[8,64]{1,0} parameter(1)
  %w = bf16[1,64]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %z = s32[] constant(0)
  %twice = f32[4]{0} add(%c, %c)
  %dus = bf16[8,64]{1,0} dynamic-update-slice(%buf, %w, %i, %z)
  ROOT %t = (f32[4]{0}, bf16[8,64]{1,0}) tuple(%twice, %dus)
}

ENTRY %main (grad: bf16[8,16], w32: bf16[1,32], w64: bf16[1,64], c: f32[4], i: s32[]) -> f32[] {
  %grad = bf16[8,16]{1,0} parameter(0)
  %w32 = bf16[1,32]{1,0} parameter(1)
  %w64 = bf16[1,64]{1,0} parameter(2)
  %c = f32[4]{0} parameter(3)
  %i = s32[] parameter(4)
  %zeros32 = bf16[8,32]{1,0} broadcast(bf16[] constant(0)), dimensions={}
  %zeros64 = bf16[8,64]{1,0} broadcast(bf16[] constant(0)), dimensions={}
  %fusion.1 = bf16[8,32]{1,0} fusion(%zeros32, %w32, %i), kind=kLoop, calls=%place
  %fusion.2 = (f32[4]{0}, bf16[8,64]{1,0}) fusion(%c, %zeros64, %w64, %i), kind=kLoop, calls=%carry_and_place
  %placed = bf16[8,64]{1,0} get-tuple-element(%fusion.2), index=1
  %carried = f32[4]{0} get-tuple-element(%fusion.2), index=0
  %ar = (bf16[8,16]{1,0}, bf16[8,32]{1,0}, bf16[8,64]{1,0}) all-reduce(%grad, %fusion.1, %placed), channel_id=1, replica_groups=mesh['axis_0'=8] {'axis_0'}, use_global_device_ids=true, to_apply=%add
  %summed = bf16[8,16]{1,0} get-tuple-element(%ar), index=0
  %dynamic-slice_convert_fusion.8 = f32[1,16]{1,0} fusion(%summed, %i), kind=kLoop, calls=%shard_as_f32
  %g32 = bf16[8,32]{1,0} get-tuple-element(%ar), index=1
  %g64 = bf16[8,64]{1,0} get-tuple-element(%ar), index=2
  ROOT %r = f32[] constant(0)
}
"""


def test_fused_shard_reads_and_fused_zero_buffers_keep_their_roles():
    stats = hlo.collective_stats(FUSED_ROLES)
    assert stats.bytes_by_kind() == {"all-reduce": (8 * 16 + 8 * 32 + 8 * 64) * 2}
    assert stats.bytes_by_role() == {"reduce-scatter": 8 * 16 * 2,
                                     "all-gather": (8 * 32 + 8 * 64) * 2}
    # The carried (f32) output of the multi-output fusion is no zero buffer: reduced in its
    # place, it is an all-reduce; a cast slice of two shards is not one shard.
    other = FUSED_ROLES.replace("all-reduce(%grad, %fusion.1, %placed)",
                                "all-reduce(%grad, %fusion.1, %carried)") \
        .replace("bf16[8,64]{1,0}) all-reduce", "f32[4]{0}) all-reduce") \
        .replace("%g64 = bf16[8,64]{1,0}", "%g64 = f32[4]{0}")
    assert hlo.collective_stats(other).bytes_by_role() == {
        "reduce-scatter": 8 * 16 * 2, "all-gather": 8 * 32 * 2, "all-reduce": 4 * 4}
    wider = FUSED_ROLES.replace("f32[1,16]", "f32[2,16]").replace("bf16[1,16]", "bf16[2,16]") \
        .replace("sizes={1,16}", "sizes={2,16}")
    assert hlo.collective_stats(wider).bytes_by_role()["all-reduce"] == 8 * 16 * 2


def test_fsdp_step_on_a_whole_torus_reduces_each_gradient_to_its_shard():
    """The train step of two layers with DeepSeek-V3's attention widths (Q = 1536, C = 512,
    128 heads) under FSDP over all 512 chips of a v5p-1024 (8x8x8 torus), compile only, on the
    planner's devices. libtpu writes every gradient reduction over the whole torus as an
    all-reduce of the whole gradient read by one shard's slice: by role, a reduce-scatter,
    including w_uq [1536, 128, 192] and w_uk/w_uv [512, 128, 128], split into shards of 3 and 1
    rows whose slices the compiler fuses with their cast to f32 (before, their 6.3 GiB per V3
    step counted as whole all-reduces). Only the loss's scalars are all-reduced; the weight
    gathers are all-gather instructions (with the slice's wraparound links, `Target.wrap`)."""
    from deepseek_jax.config import get_config
    from deepseek_jax.tools.compile import Strategy, compile_strategy
    from deepseek_jax.tools.targets import parse_target
    c = get_config("tiny", vocab_size=1024, d_model=1024, n_layers=2, n_dense_layers=2,
                   d_ff=512, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mtp_depth=0,
                   dtype=jnp.bfloat16)
    pytest.importorskip("libtpu")
    r = compile_strategy(c, Strategy.make("fsdp", {"fsdp": 512}),
                         parse_target("tpu-v5p-1024").devices(), 512, 256)
    stats = r["collectives"]
    kinds, roles = stats.bytes_by_kind(), stats.bytes_by_role()
    assert set(kinds) == {"all-gather", "all-reduce", "all-to-all"}     # what libtpu wrote
    # Every weight gather (≥ 1 MiB) is an all-gather instruction; the norms' f32 scales (KiBs)
    # ride along in combined all-reduces.
    assert {c.kind for c in stats.collectives
            if c.role == "all-gather" and c.result_bytes >= 2**20} == {"all-gather"}
    assert roles["all-reduce"] <= 16, [(x.name, x.result_bytes) for x in stats.collectives
                                       if x.role == "all-reduce"]
    # Each parameter's gradient is reduced once, in bf16 (2 bytes a value; the norms' in f32),
    # except the embedding table's: a scatter-add into this device's slice, no reduction.
    n_params = r["params"] * 512 // 4               # fp32, every parameter split 512 ways
    assert roles["reduce-scatter"] >= 2 * (n_params - c.vocab_size * c.d_model)
