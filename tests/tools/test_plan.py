"""The planner end to end on 8 fake CPU devices, the analytic model against the compiler, and an
ahead-of-time compile for a TPU topology (libtpu, no TPU)."""

import csv
import math
import os
import re

import flax
import jax
import jax.numpy as jnp
import pytest

from deepseek_jax import parallel
from deepseek_jax.config import get_config
from deepseek_jax.tools import cost_model, plan, report
from deepseek_jax.tools.compile import Strategy, compile_strategy
from deepseek_jax.tools.targets import parse_target
from deepseek_jax.train.flops import flops_per_token
from deepseek_jax.train import sharded

# Another process on the host may hold libtpu's TPU lock; compile-only use does not need it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

CPU8 = parse_target("cpu-8")
GiB = 2 ** 30
STRATEGIES = "dp,fsdp,fsdp_tp:tensor=2"


# The tiny model with dense FFNs everywhere: its collectives are the textbook ones for each
# strategy (the MoE layers are covered by the small and TPU compiles below).
TINY_DENSE = get_config("tiny", n_routed_experts=0)


@pytest.fixture(scope="module")
def tiny_plan():
    """One planner run: three strategies compiled on cpu-8."""
    return plan.plan(TINY_DENSE, "cpu-8", batch=8, seq=32, strategies=STRATEGIES,
                     log=lambda m: None)


def test_rows_are_compiled_ranked_and_complete(tiny_plan):
    header, rows = tiny_plan
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert {r["strategy"] for r in rows} == {"dp(data=8)", "fsdp(fsdp=8)",
                                              "fsdp_tp(fsdp=4,tensor=2)"}
    for r in rows:
        assert r["source"] == "compiled (cpu)" and r["fits"]
        assert 0 < r["params"] < r["total"] <= r["hbm"]
        assert r["act_temp"] > 0 and r["compile_s"] > 0
        assert r["comm"], r["strategy"]
    steps = [r["step_s"] for r in rows]
    assert steps == sorted(steps)
    by = {r["preset"]: r for r in rows}
    # Sharding the state over 8 devices divides the per-chip parameter bytes by 8 (every tiny
    # weight has a dimension divisible by 8 under fsdp: embed = 32).
    assert by["fsdp"]["params"] == pytest.approx(by["dp"]["params"] / 8, rel=0.02)
    assert by["fsdp"]["optimizer"] == pytest.approx(2 * by["fsdp"]["params"], rel=0.02)
    # Pure data parallelism communicates only (gradient and metric) all-reduces.
    assert set(by["dp"]["comm"]) == {"all-reduce"}


def test_analytic_collective_bytes_match_the_compiled_hlo(tiny_plan):
    """The check the analytic model can be held to: on pure dp and pure fsdp the compiler's
    collectives are the textbook ones (tensor parallelism's are not compared: the compiler
    reshards activations in ways the Megatron model does not describe)."""
    _, rows = tiny_plan
    by = {r["preset"]: r for r in rows}
    dp, fsdp = by["dp"], by["fsdp"]
    # dp: one all-reduce of every gradient (fp32), the parameter bytes; the compiler reduces the
    # embedding's gradient once per use (main model and MTP module: +2·V·D·4 bytes = 8% here)
    # before summing, and the loss and metric scalars add a few bytes.
    assert dp["comm"]["all-reduce"] == pytest.approx(dp["analytic_comm"]["all-reduce"], rel=0.1)
    assert dp["comm"]["all-reduce"] >= dp["analytic_comm"]["all-reduce"]
    # fsdp: weights gathered in the forward and backward passes, gradients reduce-scattered.
    hlo_gather = fsdp["comm"].get("all-gather", 0.0)
    assert hlo_gather == pytest.approx(fsdp["analytic_comm"]["all-gather"], rel=0.25)
    hlo_reduce = fsdp["comm"].get("reduce-scatter", 0.0) + fsdp["comm"].get("all-reduce", 0.0)
    assert hlo_reduce == pytest.approx(fsdp["analytic_comm"]["reduce-scatter"], rel=0.25)


def test_state_bytes_agree_with_the_compiled_shardings(tiny_plan):
    _, rows = tiny_plan
    for r in rows:
        est = cost_model.estimate(TINY_DENSE, r["mesh"], r["preset"], 8, 32, CPU8)
        assert est.params == pytest.approx(r["params"], rel=1e-6), r["strategy"]
        # The analytic optimizer state leaves out AdamW's step counter (4 bytes).
        assert est.optimizer == pytest.approx(r["optimizer"], abs=16), r["strategy"]


def test_state_bytes_with_adapters_count_moments_for_the_adapters_only():
    """LoRA: the analytic model's parameter and optimizer bytes per chip are the sharded train
    state's (AdamW moments for the adapters alone), and gradients are reduced only for the
    adapters and the weights they adapt."""
    import optax
    from deepseek_jax.model import adapters
    config = get_config("tiny").replace(adapter_rank=4, adapter_targets=("attention", "mlp"))
    sizes = {"fsdp": 2, "expert": 4}
    mesh = parallel.make_mesh(sizes)
    rules = parallel.logical_axis_rules("fsdp_ep", mesh)
    state = sharded.state_shardings(config, mesh, rules, optax.adamw(1e-3))
    shapes = jax.eval_shape(lambda: sharded.init_train_state(jax.random.key(0), config,
                                                             optax.adamw(1e-3)))
    local = lambda tree, s: sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
                                for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(s)))
    got = cost_model.state_bytes(config, sizes, cost_model.rules_for("fsdp_ep", sizes))
    assert got["params"] == pytest.approx(local(shapes.params, state.params), rel=1e-9)
    moments = [x for x in jax.tree.leaves(shapes.opt_state) if x.ndim]
    assert got["optimizer"] == pytest.approx(
        local(moments, [s for x, s in zip(jax.tree.leaves(shapes.opt_state),
                                          jax.tree.leaves(state.opt_state)) if x.ndim]),
        rel=1e-9)
    trained = adapters.split(shapes.params, config)[0]
    assert got["optimizer"] == pytest.approx(
        2 * local(trained, adapters.split(state.params, config)[0]), rel=1e-9)
    # Gradients: the adapters', and W_UK's and W_UV's (adapted as W' = W + s·A·B, they form
    # dW'); not the projections adapted beside (x·A·B), nor the frozen experts, embedding, norms.
    flat = flax.traverse_util.flatten_dict(shapes.params)
    flat_s = flax.traverse_util.flatten_dict(state.params)
    reduced = [k for k in flat if adapters.is_adapter(k) or k[-1] in ("w_uk", "w_uv")]
    assert got["gradients"] == pytest.approx(
        local([flat[k] for k in reduced], [flat_s[k] for k in reduced]), rel=1e-9)
    plain = cost_model.state_bytes(adapters.plain(config), sizes,
                                   cost_model.rules_for("fsdp_ep", sizes))
    assert got["scatter"] < plain["scatter"] and got["gradients"] < plain["gradients"]


def test_outputs_written(tiny_plan, tmp_path):
    header, rows = tiny_plan
    paths = report.write_all(header, rows, str(tmp_path))
    md = open(paths[0]).read()
    assert "| 1 | " in md and "fsdp_tp(fsdp=4,tensor=2)" in md
    with open(paths[1]) as f:
        table = list(csv.DictReader(f))
    assert [int(t["rank"]) for t in table] == [1, 2, 3]
    assert float(table[0]["total_gib"]) > 0
    with open(paths[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = report.text_table(header, rows)
    assert text.splitlines()[0].startswith("custom config (")
    assert "dp(data=8)" in text


def test_all_enumerates_prunes_and_explains_on_small():
    """`all` on the small model: every valid mesh is scored, none is dropped silently."""
    header, rows = plan.plan("small", "cpu-8", batch=16, seq=64, strategies="all",
                             analytic_only=True, log=lambda m: None)
    labels = [r["strategy"] for r in rows]
    assert len(labels) == len(set(labels)) >= 8
    assert {"dp(data=8)", "fsdp(fsdp=8)", "fsdp_ep(expert=8)"} <= set(labels)
    assert all(r["source"] == "analytic" for r in rows)
    # Each row is a mesh that exists on the 8 devices and that the library's own pre-compile
    # check (actual parameter shapes against the mesh, independent of the planner's filter)
    # accepts for this batch.
    config = plan.load_model("small")
    for r in rows:
        mesh = parallel.make_mesh(r["mesh"], jax.devices())
        sharded.validate(config, mesh, parallel.logical_axis_rules(r["preset"], mesh), 16)
    # A strategy that cannot shard the model is dropped with its reason.
    assert "heads size 4 does not split" in plan.shard_problem(
        config, Strategy.make("fsdp_tp", {"fsdp": 1, "tensor": 8}), 16)


def test_expert_parallel_moe_compiles_on_cpu():
    """The MoE layers under expert parallelism (shard_map + all-to-all) through the planner."""
    header, rows = plan.plan("tiny", "cpu-8", batch=8, seq=32, strategies="fsdp_ep:expert=4",
                             log=lambda m: None)
    (r,) = rows
    assert r["strategy"] == "fsdp_ep(fsdp=2,expert=4)" and r["source"] == "compiled (cpu)"
    assert r["fits"]
    assert r["comm"].get("all-to-all", 0) + r["comm"].get("ragged-all-to-all", 0) > 0


def test_strategy_syntax_and_errors():
    t = parse_target("cpu-8")
    s = plan.parse_strategies("fsdp_ep:expert=2,data=2:fsdp=4,dp", t)
    assert [x.label for x in s] == ["fsdp_ep(fsdp=4,expert=2)", "fsdp(data=2,fsdp=4)",
                                    "dp(data=8)"]
    with pytest.raises(plan.PlanError, match="AXIS=SIZE"):
        plan.parse_strategies("fsdp:fsdb=8", t)
    with pytest.raises(plan.parallel.MeshError, match="does not divide 8"):
        plan.parse_strategies("fsdp_tp:tensor=3", t)
    with pytest.raises(plan.PlanError, match="batch 12 does not split"):
        plan.plan("tiny", "cpu-8", batch=12, seq=32, strategies="dp", log=lambda m: None)


def test_flops_from_config_match_xla_on_an_unrolled_model():
    """XLA's cost_analysis counts a scanned loop body once (a scanned small model reports under
    a third of the unrolled count); on an unrolled model (no remat) its count is the whole step, and the config formula (matmuls and attention) must agree. Dense
    FFNs: on CPU ragged_dot is lowered densely over the experts, so XLA would count every expert."""
    config = get_config("small", scan_layers=False, mtp_depth=0, n_routed_experts=0)
    batch, seq = 4, 64
    one = Strategy.make("dp", {"data": 1})
    unrolled = compile_strategy(config, one, jax.devices()[:1], batch, seq)
    predicted = flops_per_token(config, seq) * batch * seq
    # XLA also counts the elementwise work (norms, softmax, RoPE, AdamW) the formula leaves out:
    # 7% at these widths (less at scale), so the formula must sit 0–12% below XLA.
    assert 0.88 < predicted / unrolled["xla_flops"] <= 1.0


def test_gpu_target_is_analytic_and_says_so():
    # A100s are never compiled for (gpu_targets.py describes Hopper only), plugin or not.
    header, rows = plan.plan("v2-lite", "gpu-a100-64", batch=64, seq=2048,
                             strategies="fsdp,fsdp_ep:expert=8", log=lambda m: None)
    assert header["analytic_only"]
    assert all(r["source"] == "analytic" and "analytic only" in r["note"] for r in rows)
    assert all(r["fits"] for r in rows)
    text = report.text_table(header, rows)
    assert "analytic only" in text


def test_tpu_topology_compile_ahead_of_time():
    """The tiny model compiled for a v5e 2x4 slice from this CPU host (libtpu installed)."""
    pytest.importorskip("libtpu")
    header, rows = plan.plan("tiny", "tpu-v5e-8", batch=8, seq=32, strategies="fsdp",
                             isolate=False, log=lambda m: None)
    (r,) = rows
    assert r["source"] == "compiled (tpu)", r["note"]
    assert r["fits"] and 0 < r["total"] < 15.75 * 2 ** 30
    assert r["host_temp"] == 0 and "host memory" not in r["note"]
    # FSDP on TPU: weight all-gathers and gradient reductions (at these tiny sizes the compiler
    # all-reduces; at scale it writes reduce-scatters as `all-reduce-scatter` fusions).
    reduced = r["comm"].get("reduce-scatter", 0) + r["comm"].get("all-reduce", 0)
    assert r["comm"].get("all-gather", 0) > 0 and reduced > 0
    assert math.isfinite(r["step_s"]) and 0 < r["mfu"] <= 1


def test_offloaded_activations_leave_the_tpu_memory_and_are_reported():
    """The block inputs offloaded to host memory on a v5e slice: the compiler places them in
    host memory, and the row says how much (without offload, none: the test above)."""
    pytest.importorskip("libtpu")
    _, (row,) = plan.plan("tiny", "tpu-v5e-8", batch=8, seq=32, strategies="fsdp",
                          remat="custom:layer_input=offload", isolate=False, log=lambda m: None)
    # at least the 3 layers' [1, 32, 32] fp32 inputs of this chip's one sequence
    assert row["host_temp"] >= 3 * 32 * 32 * 4
    assert "offloaded to host memory" in row["note"]
    assert "host" not in {b["kind"] for b in row["peak_buffers"]}


def test_several_remat_policies_give_one_row_each():
    """`--remat` repeated: every strategy under every policy, each row labelled with its own,
    ranked together (analytic: keeping only the block inputs and the attention outputs needs
    less activation memory than keeping everything)."""
    kept = "custom:layer_input=offload,context=save"
    header, rows = plan.plan("tiny", "cpu-8", batch=8, seq=32, strategies="fsdp,dp",
                             remat=["none", kept], analytic_only=True, log=lambda m: None)
    assert header["remat"] == f"none | {kept}"
    assert sorted((r["strategy"], r["remat"]) for r in rows) == [
        (f"dp(data=8) remat={kept}", kept), ("dp(data=8) remat=none", "none"),
        (f"fsdp(fsdp=8) remat={kept}", kept), ("fsdp(fsdp=8) remat=none", "none")]
    act = {(r["preset"], r["remat"]): r["act_temp"] for r in rows}
    assert act["fsdp", kept] < act["fsdp", "none"] and act["dp", kept] < act["dp", "none"]
    assert {r["remat"] for r in report.csv_rows(rows)} == {"none", kept}


def test_host_memory_values_are_listed_as_such_and_left_out_of_the_device_peak():
    """A loop of 4 steps whose [256, 256] fp32 intermediates (256 KiB each) the remat policy
    offloads, compiled for one chip of a v5e slice: the 1 MiB stack of them sits in host memory, listed
    as kind "host", and the device's peak holds none of it."""
    pytest.importorskip("libtpu")
    from jax.ad_checkpoint import checkpoint_name
    from jax.sharding import NamedSharding, PartitionSpec as P

    from deepseek_jax.tools import buffers

    def layer(x, w):
        h = checkpoint_name(jnp.tanh(x @ w), "h")                            # [256, 256]
        return jnp.tanh(h @ w), None

    policy = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["h"],
        offload_src="device", offload_dst="pinned_host")
    loss = lambda w, x: jax.lax.scan(jax.checkpoint(layer, policy=policy), x, w)[0].sum()
    device = parse_target("tpu-v5e-4").devices()[0]
    one = NamedSharding(jax.sharding.Mesh([device], ("d",)), P())
    lowered = jax.jit(jax.grad(loss), in_shardings=(one, one)).lower(
        jax.ShapeDtypeStruct((4, 256, 256), jnp.float32), jax.ShapeDtypeStruct((256, 256),
                                                                                 jnp.float32))
    compiled, assignment, live = buffers.compile_with_assignment(lowered)
    text = compiled.as_text()
    host = [b for b in buffers.largest_buffers(assignment, text, n=100) if b.kind == "host"]
    assert max(b.bytes for b in host) >= 4 * 256 * 256 * 4, host
    peak, _ = buffers.peak_buffers(live, assignment, text, n=None)
    assert peak and all(b.kind != "host" for b in peak)


@pytest.mark.parametrize("model, target, batch, count", [
    ("v3-671b", "tpu-v5p-1024", 512, 40),
    ("v2-lite", "tpu-v5p-128", 64, 26),
])
def test_every_listed_strategy_builds_its_mesh_on_the_topology(model, target, batch, count):
    """Each strategy `all` lists is built as a mesh on the target's compile-only TPU devices
    (the devices the planner compiles for), and each axis covers its devices on the torus.
    On a v5p 8x8x8 slice most EP and TP meshes need a torus dimension split between two axes
    (fsdp=128 × expert=4: 128 cannot be whole dimensions once 4 takes part of one); the row
    says so."""
    pytest.importorskip("libtpu")
    t = parse_target(target)
    config = plan.load_model(model)
    devices = t.devices()
    strategies = plan.enumerate_strategies(config, t, batch)
    assert len(strategies) == count
    n_split = 0
    for s in strategies:
        mesh = parallel.make_mesh(s.mesh, devices)
        assert {a: n for a, n in mesh.shape.items()} == s.mesh, s.label
        layout = parallel.torus_layout(mesh)
        for axis, dims in layout.items():
            assert math.prod(dims.values()) == s.mesh[axis], (s.label, layout)
        note = plan.layout_note(s, devices, t)
        split = parallel.split_dimensions(layout, t.slice_shape)
        assert bool(note) == bool(split), s.label
        n_split += bool(split)
    assert n_split > 0
    if model == "v3-671b":
        first = Strategy.make("fsdp_ep", {"fsdp": 128, "expert": 4})
        assert first in strategies
        assert "split as fsdp 2 × expert 4" in plan.layout_note(first, devices, t)


def test_all_splits_the_sequences_when_the_batch_cannot_fill_the_slice():
    """`all` with fewer sequences than a slice's devices adds context parallelism, with sizes
    that cut the sequence into whole zigzag chunks; for one 131k-token sequence of v2-lite on 8
    chips the analytic model ranks fsdp_cp(context=8) first, ahead of tensor parallelism, as
    the compiled numbers in BENCHMARKS.md do (44.2 against 64.3 GiB per chip). A batch that
    fills the slice enumerates what it did before."""
    t = parse_target("tpu-v5p-16")
    config = plan.load_model("v2-lite")
    one = plan.enumerate_strategies(config, t, 1, 131072)
    assert "fsdp_cp(context=8)" in [s.label for s in one]
    ranked = plan.rank([plan.build_row(config, s, t, 1, 131072, None) for s in one])
    assert ranked[0]["strategy"] == "fsdp_cp(context=8)"
    few = plan.enumerate_strategies(config, t, 4, 32768)
    assert {s.preset for s in few} >= {"fsdp_cp", "fsdp_ep_cp"}
    assert all(32768 % (2 * s.mesh["context"]) == 0 for s in few)
    # 40 tokens: 8 zigzag chunks (4 ranks) but not 16 (8 ranks)
    assert all(s.mesh["context"] == 1
               for s in plan.enumerate_strategies(config, t, 1, 40))   # one needs 8 ranks
    assert [s.label for s in plan.enumerate_strategies(config, t, 2, 40)
            if s.preset == "fsdp_cp"] == ["fsdp_cp(fsdp=2,context=4)"]
    full = plan.enumerate_strategies(config, t, 8, 4096)
    assert full == plan.enumerate_strategies(config, t, 8)
    assert all(s.mesh["context"] == 1 for s in full)


def test_failed_compile_is_shown_failed_and_ranked_last():
    config = plan.load_model(TINY_DENSE)
    ok = plan.build_row(config, Strategy.make("dp", {"data": 8}), CPU8, 8, 32, None)
    failed = plan.build_row(config, Strategy.make("fsdp", {"fsdp": 8}), CPU8, 8, 32,
                            {"fits": None, "error": "XlaRuntimeError: INTERNAL: boom"})
    assert failed["source"] == "compile failed" and failed["fits"] is None
    assert "compile failed" in failed["note"] and "boom" in failed["note"]
    # Even with a smaller analytic step time, the failed row ranks after the one that worked.
    failed["step_s"], failed["total"] = 0.0, 0.0
    assert [r["strategy"] for r in plan.rank([failed, ok])] == ["dp(data=8)", "fsdp(fsdp=8)"]
    text = report.text_table({"model": "tiny", "params_b": 0, "mtp_b": 0, "target": "cpu-8",
                              "batch": 8, "seq": 32, "remat": "none", "dtype": "float32",
                              "param_dtype": "float32", "hbm_gib": 1, "peak_tflops": 1},
                             plan.rank([failed, ok]))
    assert "2. fsdp(fsdp=8): compile failed" in text


def test_compiled_rows_list_their_largest_buffers(tiny_plan):
    """Each compiled row names the buffers that dominate its memory, from the compiler's buffer
    assignment: under dp every chip holds every weight, so the largest buffer is at least the
    largest parameter (the fp32 embedding or output head, V × D × 4 bytes); here it is the
    attention scores of the scanned layers."""
    _, rows = tiny_plan
    by = {r["preset"]: r for r in rows}
    for r in rows:
        bufs = r["buffers"]
        assert 3 <= len(bufs) <= 8, r["strategy"]
        sizes = [b["bytes"] for b in bufs]
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] > 0
        assert {b["kind"] for b in bufs} <= {"parameter", "output", "temp", "constant"}
        assert all(b["shape"] and "[" in b["shape"] for b in bufs)
    vd = TINY_DENSE.vocab_size * TINY_DENSE.d_model * 4
    assert by["dp"]["buffers"][0]["bytes"] >= vd
    text = report.markdown({"model": "tiny", "params_b": 0, "mtp_b": 0, "target": "cpu-8",
                            "batch": 8, "seq": 32, "remat": "none", "dtype": "float32",
                            "param_dtype": "float32", "hbm_gib": 1, "peak_tflops": 1}, rows)
    assert "Largest buffers per chip" in text and " GiB f32[" in text


def test_compiled_rows_list_what_is_live_at_the_memory_peak(tiny_plan):
    """The values live together at the peak (the compiler's live ranges) are all in memory at
    once: their sum cannot exceed what the step holds (arguments + outputs + temporaries)."""
    _, rows = tiny_plan
    for r in rows:
        peak = r["peak_buffers"]
        assert 3 <= len(peak) <= 8, r["strategy"]
        sizes = [b["bytes"] for b in peak]
        assert sizes == sorted(sizes, reverse=True)
        assert sum(sizes) <= r["peak_live"] <= r["total"], r["strategy"]
    text = report.markdown({"model": "tiny", "params_b": 0, "mtp_b": 0, "target": "cpu-8",
                            "batch": 8, "seq": 32, "remat": "none", "dtype": "float32",
                            "param_dtype": "float32", "hbm_gib": 1, "peak_tflops": 1}, rows)
    assert "Live together at the memory peak" in text


def test_peak_buffers_of_a_program_whose_peak_is_known():
    """b = a·x with a = x·x (x [256, 256] fp32): b is computed while x and a are still live, so
    the peak holds at least x, a and b (three 256 KiB values), the parameter x among them."""
    from deepseek_jax.tools import buffers
    x = jax.ShapeDtypeStruct((256, 256), jax.numpy.float32)
    lowered = jax.jit(lambda x: ((x @ x) @ x) * 2.0).lower(x)
    compiled, assignment, live = buffers.compile_with_assignment(lowered)
    peak, total = buffers.peak_buffers(live, assignment, compiled.as_text())
    assert total >= 3 * 256 * 256 * 4
    assert any(b.kind == "parameter" and b.bytes == 256 * 256 * 4 for b in peak), peak
    assert all(b.shape == "f32[256,256]" for b in peak if b.bytes == 256 * 256 * 4)
    assert buffers.peak_buffers("no peak section here", assignment) == ([], 0)


def test_peak_counts_a_loop_carry_updated_in_place_once():
    """A loop writes x[i]·x[i] into a [4, 256, 256] fp32 carry (1 MiB) in place, x (1 MiB)
    live throughout. Inside the loop the carry is two values of one piece of memory: the loop's
    carried value (a phi value) and the in-place update. The live-range dump lists both, so its
    sum exceeds the whole program; counted by the memory they occupy, the peak holds x, the
    carry once and one product (256 KiB), and no more than the compiler's total."""
    from deepseek_jax.tools import buffers

    def f(x):
        def body(i, acc):
            return jax.lax.dynamic_update_index_in_dim(acc, jnp.tanh(x[i] @ x[i]), i, 0)
        return jax.lax.fori_loop(0, 4, body, jnp.zeros_like(x)) * 2.0 + x

    mib = 1 << 20
    x = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32)
    compiled, assignment, live = buffers.compile_with_assignment(jax.jit(f).lower(x))
    m = compiled.memory_analysis()
    program = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)
    peak, occupied = buffers.peak_buffers(live, assignment, compiled.as_text())
    section = live.split("(peak):")[1].split("Stack trace")[0]
    each_value = sum(int(b) for b in re.findall(r": (\d+) bytes", section))
    assert each_value > program                 # the dump counts the carry twice
    assert 2 * mib + mib // 4 <= occupied <= program, (occupied, program)
    whole = [b for b in peak if b.bytes == mib]
    assert len(whole) == 2 and {b.shape for b in whole} == {"f32[4,256,256]"}, peak
    assert sum(b.kind == "parameter" for b in whole) == 1, peak


def test_rows_say_where_collectives_leave_the_analytic_model(tiny_plan):
    _, rows = tiny_plan
    for r in rows:
        mismatch = plan.comm_mismatch(r["comm"], r["analytic_comm"])
        assert (mismatch in r["note"]) if mismatch else "off the analytic" not in r["note"]
    # dp is within the band (all-reduce +8 %: the embedding's gradient reduced once per use).
    assert plan.comm_mismatch({k: v for k, v in rows[0]["comm"].items()}, rows[0]["comm"]) == ""
    by = {r["preset"]: r for r in rows}
    assert "off the analytic" not in by["dp"]["note"]
    assert plan.comm_mismatch({"all-gather": 2.0 * GiB}, {"all-gather": 1.0 * GiB}) == (
        "collectives off the analytic model by more than 1.2×: all-gather 2.0 GiB vs 1.0 GiB "
        "(2.00×)")
    # Which op reduces a gradient is the compiler's choice: RS and AR are compared together.
    assert plan.comm_mismatch({"all-reduce": 1.0 * GiB}, {"reduce-scatter": 1.1 * GiB}) == ""
    assert "not in the model" in plan.comm_mismatch({"collective-permute": 1.0 * GiB}, {})


def test_microbatches_reach_the_compile_and_the_model():
    """--microbatches=k compiles the step that accumulates k micro-batches (the train step's
    own `microbatches`), models the activations of batch/k with weights gathered and gradients
    reduced once per micro-batch, says so in the title, and refuses a k that does not divide
    the batch before compiling anything."""
    header, rows = plan.plan(TINY_DENSE, "cpu-8", batch=16, seq=32, strategies="fsdp",
                             log=lambda m: None, microbatches=2)
    (row,) = rows
    assert row["source"] == "compiled (cpu)" and row["fits"]
    sizes = {"fsdp": 8}
    one = cost_model.estimate(TINY_DENSE, sizes, "fsdp", 8, 32, CPU8)
    two = cost_model.estimate(TINY_DENSE, sizes, "fsdp", 16, 32, CPU8, microbatches=2)
    assert two.activations == one.activations
    assert two.comm_bytes["all-gather"] == 2 * one.comm_bytes["all-gather"]
    assert two.model_flops == 2 * one.model_flops
    assert "global batch 16 × seq 32 in 2 micro-batches" in report.text_table(header, rows)
    with pytest.raises(plan.PlanError, match="--microbatches=3 must be >= 1 and divide"):
        plan.plan(TINY_DENSE, "cpu-8", batch=16, seq=32, strategies="fsdp", microbatches=3)


def test_flops_with_adapters_match_xla_on_an_unrolled_model():
    """With LoRA adapters the frozen weights form no weight gradient: the formula counts 4 per
    frozen parameter and 6 per adapter parameter, and must sit in the same band below XLA's
    count of the compiled adapter step as the plain model's (previous test), where 6 for every
    weight would sit 28 % above it (0.91 against 1.28 here)."""
    config = get_config("small", scan_layers=False, mtp_depth=0, n_routed_experts=0,
                        adapter_rank=8, adapter_targets=("attention", "mlp"))
    batch, seq = 4, 64
    one = Strategy.make("dp", {"data": 1})
    unrolled = compile_strategy(config, one, jax.devices()[:1], batch, seq)
    predicted = flops_per_token(config, seq) * batch * seq
    assert 0.88 < predicted / unrolled["xla_flops"] <= 1.0
    plain = flops_per_token(config.replace(adapter_rank=0), seq)
    assert flops_per_token(config, seq) < 0.8 * plain


def test_pipeline_strategies_are_planned_and_compiled():
    """The 5-layer tiny model (4 MoE layers) on cpu-8: `all` lists 2-stage pipelines, a named
    one compiles with the model's pipeline_stages set from its mesh, its parameter bytes are the
    compiled shardings' (the MoE stack split over stage × fsdp, the rest over fsdp), and the
    analytic permutes are the compiled ones: each of J + P − 1 = 3 ticks hands a micro-batch of
    one row per device ([1, 32, 32] fp32 = 4 KiB) on, forward and backward, and the entry and
    exit move the stage group's 2 rows, forward and backward (the compiled step adds the
    positions' and masks' few hundred bytes)."""
    config = get_config("tiny", n_layers=5, pipeline_microbatches=2)
    listed = {s.label for s in plan.enumerate_strategies(config, CPU8, 8)}
    assert "fsdp_pp(stage=2,fsdp=4)" in listed
    _, rows = plan.plan(config, "cpu-8", batch=8, seq=32, strategies="fsdp,fsdp_pp:stage=2",
                        log=lambda m: None)
    by = {r["preset"]: r for r in rows}
    pp = by["fsdp_pp"]
    assert pp["source"] == "compiled (cpu)" and pp["fits"]
    staged = plan.config_for(config, Strategy.make("fsdp_pp", pp["mesh"]))
    assert staged.pipeline_stages == 2
    est = cost_model.estimate(staged, pp["mesh"], "fsdp_pp", 8, 32, CPU8)
    assert est.params == pytest.approx(pp["params"], rel=1e-6)
    assert pp["params"] > by["fsdp"]["params"]       # the unpipelined weights: 4 ways, not 8
    assert pp["comm"]["collective-permute"] == pytest.approx(
        2 * 3 * 4096 + 4 * 8192, rel=0.02)
    assert pp["analytic_comm"]["collective-permute"] == 2 * 3 * 4096 + 4 * 8192
    assert "collective-permute" not in by["fsdp"]["comm"]
    with pytest.raises(plan.PlanError, match="pipeline_microbatches=4 of 4 batch shards"):
        plan.plan(config.replace(pipeline_microbatches=4), "cpu-8", batch=8, seq=32,
                  strategies="fsdp_pp:stage=2", analytic_only=True, log=lambda m: None)
