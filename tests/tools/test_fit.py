"""The fit verdict for a run config (`tools.fit`): the mesh the trainer would build, the
micro-batches it would accumulate, and the memory limit of the devices it names."""

import os

import jax
import pytest

from deepseek_jax import parallel
from deepseek_jax.configs import pretrain
from deepseek_jax.tools import fit

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")    # compile-only libtpu, shared host


def test_strategy_is_the_mesh_the_trainer_builds():
    c = pretrain.get_config("tiny")
    c.mesh.preset = "fsdp"
    assert fit.run_strategy(c.mesh, 8).label == "fsdp(fsdp=8)"        # all sizes 0: default
    c.mesh.data, c.mesh.fsdp = 2, 4
    s = fit.run_strategy(c.mesh, 8)
    mesh = parallel.make_mesh(parallel.run_mesh_config(c.mesh, 8), jax.devices()[:8])
    assert s.mesh == dict(mesh.shape) and s.label == "fsdp(data=2,fsdp=4)"


def test_micro_batches_are_compiled_as_the_run_accumulates_them():
    """64 × 256 tokens on a v5e-8 slice: accumulating over 4 micro-batches keeps a quarter of
    the activations live at a time, so the compiled per-chip total must drop (the extra fp32
    gradient accumulator of the tiny model is a few MiB, its activations tens of MiB)."""
    c = pretrain.get_config("tiny")
    c.data.global_batch, c.data.seq_len = 64, 256
    whole = fit.verdict(c, target="tpu-v5e-8")
    c.train.microbatches = 4
    quarter = fit.verdict(c, target="tpu-v5e-8")
    assert whole["fits"] and quarter["fits"] and whole["source"] == "compiled"
    assert quarter["total"] < whole["total"]
    assert "in 4 micro-batches" in quarter["detail"]
    assert abs(whole["limit"] - 16 * 2 ** 30) < 2 ** 30                  # a v5e chip's HBM


def test_this_machines_cpu_devices_report_no_limit():
    """On CPU devices (no `bytes_limit` in their memory stats) the verdict gives the total
    and says no limit is known, neither fitting nor failing."""
    v = fit.verdict(pretrain.get_config("tiny"), devices=jax.devices()[:8])
    assert v["fits"] is None and v["total"] > 0
    assert "no memory limit reported here" in v["detail"]


def test_pipeline_run_config_is_compiled_with_its_stages():
    """A run config with preset fsdp_pp: the verdict compiles the step with the model's
    pipeline_stages taken from the mesh, as the trainer sets it (`run.scheduled`)."""
    c = pretrain.get_config("tiny")
    c.mesh.preset, c.mesh.pipeline_microbatches = "fsdp_pp", 2
    v = fit.verdict(c, devices=jax.devices()[:8])
    assert v["strategy"] == "fsdp_pp(stage=2,fsdp=4)" and v["source"] == "compiled"
    c.mesh.pipeline_microbatches = 4           # 8 rows: 4 micro-batches of 2 over fsdp = 4
    with pytest.raises(ValueError, match="pipeline_microbatches=4"):
        fit.verdict(c, devices=jax.devices()[:8])
