"""The converter with relative --hf and --out (Orbax itself refuses relative paths), and an --out
that cannot hold a checkpoint failing before any tensor is read."""

import os

import pytest

from deepseek_jax.hf import MTPWeightsMissing, restore_converted
from deepseek_jax.hf import convert as convert_module
from deepseek_jax.train.workdir import WorkdirError
from deepseek_jax import parallel
from hf_helpers import fixture


def test_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf = os.path.relpath(fixture("moonlight"), tmp_path)
    with pytest.warns(MTPWeightsMissing):
        convert_module.main(["--hf", hf, "--out", "rel/moon", "--preset", "fsdp",
                             "--mesh", "fsdp=8", "--dtype", "float32"])
    assert os.path.isdir(tmp_path / "rel" / "moon" / "checkpoints" / "0" / "state")
    mesh, rules = parallel.mesh_and_rules("fsdp", {"fsdp": 8})
    config, variables = restore_converted("rel/moon", mesh, rules)
    assert variables["params"]["embed"].shape[0] == config.vocab_size


def test_out_under_a_file_fails_before_reading(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")

    def must_not_read(*args, **kwargs):
        raise AssertionError("a tensor was read before --out was checked")

    monkeypatch.setattr(convert_module, "device_leaf", must_not_read)
    with pytest.raises(WorkdirError, match="cannot create .*--out"), \
            pytest.warns(MTPWeightsMissing):
        convert_module.convert_to_orbax(fixture("moonlight"), str(tmp_path / "a_file" / "out"),
                                        mesh_config={"fsdp": 8})
