"""Positions in the run configs: plain RoPE while pretraining, YaRN only in the context-extension
phases, which start from a pretraining run (V3 §4.3). End to end on `tiny` → `tiny-ext`."""

import dataclasses

import jax
import numpy as np
import pytest

from deepseek_jax.config import get_config as get_model_config
from deepseek_jax.configs.pretrain import get_config, to_model_config
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.trainers import pretrain

PRETRAINING = ("tiny", "small", "v2-lite", "v3-671b")


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_runs_use_plain_rope(name):
    model = to_model_config(get_config(name).model)
    assert model.rope_factor == 1.0 and not model.uses_yarn
    assert model.softmax_scale == model.qk_head_dim ** -0.5        # no YaRN temperature


def test_v3_extension_phases_follow_the_report():
    released = get_model_config("v3-671b")                          # as config.json has it
    for name, seq, batch in (("v3-671b-32k", 32768, 1920), ("v3-671b-128k", 131072, 480)):
        c = get_config(name)
        model = to_model_config(c.model)
        # YaRN exactly as the released weights' config: s = 40 over 4096, β 32 / 1, √t mscale 1.
        for field in ("rope_factor", "rope_original_max_len", "rope_beta_fast",
                      "rope_beta_slow", "rope_mscale", "rope_mscale_all_dim", "max_seq_len"):
            assert getattr(model, field) == getattr(released, field), (name, field)
        assert model.softmax_scale == pytest.approx(0.1352338, abs=5e-8)   # spec §2.3
        assert (c.data.seq_len, c.data.global_batch, c.train.steps) == (seq, batch, 1000)
        assert c.optim.lr == 7.3e-6 and c.optim.schedule == "constant"
        assert c.init.required and c.init.pretrain_dir == ""
        # Same architecture as the pretraining run it continues.
        pre = to_model_config(get_config("v3-671b").model)
        same = lambda m: {k: v for k, v in dataclasses.asdict(m).items()
                          if not k.startswith("rope_") and k not in
                          ("max_seq_len",)}
        assert same(model) == same(pre)


def _small_run(c, data_dir, steps):
    c.data.data_dir = str(data_dir)
    c.train.update(steps=steps, checkpoint_every=steps, eval_every=0, async_checkpoint=False)
    return c


def test_extension_starts_from_the_pretraining_run_with_yarn_on(tmp_path):
    data = tmp_path / "data"
    pre_dir, ext_dir = tmp_path / "pre", tmp_path / "ext"
    pretrain.train_and_evaluate(_small_run(get_config("tiny"), data, 2), str(pre_dir))

    ext = _small_run(get_config("tiny-ext"), data, 1)
    with pytest.raises(ValueError, match="init.pretrain_dir"):
        pretrain.train_and_evaluate(ext, str(tmp_path / "orphan"))

    ext.init.pretrain_dir = str(pre_dir)
    ext.optim.lr = 0.0               # one step that moves nothing: the start is visible
    ext.train.bias_update_rate = 0.0
    pretrain.train_and_evaluate(ext, str(ext_dir))
    pre_config, pre_vars = ckpt.load_trained(str(pre_dir))
    ext_config, ext_vars = ckpt.load_trained(str(ext_dir))
    assert not pre_config.uses_yarn and ext_config.uses_yarn
    assert (ext_config.rope_factor, ext_config.rope_original_max_len) == (2.0, 32)
    jax.tree.map(np.testing.assert_array_equal, ext_vars, pre_vars)

    # Another architecture is refused, with the fields named.
    other = _small_run(get_config("tiny-ext"), data, 1)
    other.init.pretrain_dir = str(pre_dir)
    other.model.n_heads = 2
    with pytest.raises(ValueError, match="n_heads"):
        pretrain.train_and_evaluate(other, str(tmp_path / "other"))


def test_model_config_defaults_keep_yarn_for_released_weights():
    # Imported checkpoints keep their config.json's YaRN (tests/hf compares them with
    # transformers); only the pretraining run configs switch it off.
    model = get_model_config("v3-671b")
    assert model.uses_yarn and model.softmax_scale == pytest.approx(0.1352338, abs=5e-8)
