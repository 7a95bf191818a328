"""The GRPO entrypoint end to end on the tiny config: it samples, scores, updates every
parameter, logs the documented metrics, checkpoints and resumes."""

import json
import os

import jax
import numpy as np

from deepseek_jax.train.checkpoint import load_trained
from experiments import grpo
from experiments.configs.grpo import get_config


def test_tiny_grpo_run(tmp_path):
    c = get_config("tiny")
    c.data.num_train, c.data.num_eval = 300, 20
    c.train.steps = 3
    c.train.checkpoint_every = 3
    c.rl.format_weight = 1.0
    workdir = str(tmp_path)
    result = grpo.train_and_evaluate(c, workdir)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "accuracy_reward_mean", "format_reward_mean", "kl", "entropy",
                "clip_low_frac", "clip_high_frac", "zero_variance_groups", "completion_length",
                "truncation_rate", "sampler_trainer_logp_gap"):
        assert key in rows[-1], key
    # The sampler's log-probs are the trainer's (same tokens, same temperature): fp32 rounding.
    assert all(r["sampler_trainer_logp_gap"] < 1e-4 for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)
    # β > 0 with μ = 2: the KL against the frozen reference is ≥ 0 and appears after an update.
    assert all(r["kl"] >= 0 for r in rows)

    # Rerunning the finished run resumes and changes nothing.
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    grpo.train_and_evaluate(c, workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
    _, trained = load_trained(workdir)
    assert jax.tree.leaves(trained["params"])


def _run(tmp_path, name, num_devices):
    c = get_config("tiny")
    c.data.num_train, c.data.num_eval = 300, 20
    c.data.data_dir = str(tmp_path / "data")
    c.train.steps, c.train.eval_every = 2, 0
    c.mesh.num_devices = num_devices
    grpo.train_and_evaluate(c, str(tmp_path / name))
    rows = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    return rows, load_trained(str(tmp_path / name))[1]


def test_data_parallel_over_two_devices_equals_one(tmp_path):
    """The same run on 1 device and data-parallel over 2 (rollouts split by row, gradients
    all-reduced): same samples and rewards, the same updates up to fp32 summation order."""
    one, params_one = _run(tmp_path, "one", 1)
    two, params_two = _run(tmp_path, "two", 2)
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_length"] == \
            b["completion_length"]
        # Per-device partial sums are added in another order: ~1e-7 relative in fp32.
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-3, atol=1e-7)
    for x, y in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def _char_tokenizer(path):
    """An HF tokenizer.json with one token per character (fits the fixture's 64 ids)."""
    import tokenizers
    chars = sorted(set("What is 0123456789+-=?<>/thinkanswer"))
    vocab = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), "isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    tok.save(str(path))
    return str(path)


def test_grpo_from_an_hf_imported_checkpoint(tmp_path):
    """HF folder → converted Orbax → GRPO policy, prompts through the model's tokenizer."""
    import jax.numpy as jnp
    from deepseek_jax.checkpoint import convert_to_orbax, load_hf_checkpoint
    hf = os.path.join(os.path.dirname(__file__), "..", "checkpoint", "fixtures", "v3")
    converted = str(tmp_path / "v3_orbax")
    convert_to_orbax(hf, converted, preset="fsdp", mesh_config={"fsdp": 8}, dtype=jnp.float32)
    c = get_config("tiny")
    c.init.pretrain_dir = converted
    c.data.num_train, c.data.num_eval = 100, 8
    c.data.tokenizer = _char_tokenizer(tmp_path / "tokenizer.json")
    c.train.steps, c.train.eval_every, c.train.eval_problems = 1, 1, 8
    c.rl.bias_update_rate = 0.0                    # routing bias frozen during RL
    result = grpo.train_and_evaluate(c, str(tmp_path / "run"))
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert np.isfinite(rows[0]["loss"])
    # The imported config computes in bf16: the sampler's cached, absorbed attention and the
    # trainer's expanded attention round differently (median ~6e-3 per token here, max ~0.2).
    # The update uses the trainer's own old log-probs, so this gap is only reported.
    assert rows[0]["sampler_trainer_logp_gap"] < 0.5
    assert 0.0 <= result["after"]["accuracy"] <= 1.0
    # The policy started from the imported weights: one small update away from them at most.
    _, start = load_hf_checkpoint(hf, dtype=jnp.float32)
    _, trained = load_trained(str(tmp_path / "run"))
    assert jax.tree.structure(start["params"]) == jax.tree.structure(trained["params"])
    for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(trained["params"])):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.01     # μ·lr = 2e-3 per Adam step
    assert jax.tree.leaves(start["routing"])
    for a, b in zip(jax.tree.leaves(start["routing"]), jax.tree.leaves(trained["routing"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
