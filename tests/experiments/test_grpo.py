"""The GRPO entrypoint end to end on the tiny config: it samples, scores, updates every
parameter, logs the documented metrics, checkpoints and resumes."""

import json
import os

import jax
import numpy as np
import pytest

from flax.core.meta import unbox

from deepseek_jax.model import init_variables
from deepseek_jax.train.checkpoint import load_model_config, load_trained
from deepseek_jax.configs.grpo import get_config
from deepseek_jax.trainers import grpo


def test_tiny_grpo_run(tmp_path):
    c = get_config("tiny")
    c.data.num_train, c.data.num_eval = 300, 20
    c.train.steps = 3
    c.train.checkpoint_every = 3
    c.rl.format_weight = 1.0
    workdir = str(tmp_path)
    compiles = []          # JAX reports each compile of a jitted function (or its cache load)
    count = lambda event, *_, fun_name="", **__: compiles.append(fun_name) if event.endswith(
        "backend_compile_duration") else None
    jax.monitoring.register_event_time_span_listener(count)
    try:
        grpo.train_and_evaluate(c, workdir)
    finally:
        jax.monitoring.unregister_event_time_span_listener(count)
    # The update compiles once for the whole run (before: again at step 2, whose state came
    # out of the first update placed on the mesh, where the initial step count was not).
    assert compiles.count("jit(grpo_step)") == 1, compiles
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "accuracy_reward_mean", "format_reward_mean", "kl", "entropy",
                "clip_low_frac", "clip_high_frac", "zero_variance_groups", "completion_length",
                "truncation_rate", "sampler_trainer_logp_gap"):
        assert key in rows[-1], key
    # The sampler's log-probs are the trainer's (same tokens, same temperature): fp32 rounding.
    assert all(r["sampler_trainer_logp_gap"] < 1e-4 for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)
    # k3 = e^d − d − 1 ≥ 0, computed as expm1(d) − d within ≈ 16u|d| of its value for small d
    # (test_rl_parts, u = 2⁻²⁴): at least d²/2 − 16u|d| ≥ −128u² ≈ −4.5e-13 per token (the
    # least at |d| = 16u), and so is a mean of them, whatever the policy did.
    assert all(r["kl"] > -1e-12 for r in rows)

    # Rerunning the finished run resumes and changes nothing.
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    grpo.train_and_evaluate(c, workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
    # The checkpoint holds the whole policy, finite, in the model's own tree.
    _, trained = load_trained(workdir)
    model_config = load_model_config(workdir)
    init = jax.eval_shape(lambda key: init_variables(key, model_config), jax.random.key(0))
    assert jax.tree.structure(unbox(init["params"])) == jax.tree.structure(trained["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trained["params"]))


def _run(tmp_path, name, num_devices, **mesh):
    c = get_config("tiny")
    c.data.num_train, c.data.num_eval = 300, 20
    c.data.data_dir = str(tmp_path / "data")
    c.train.steps, c.train.eval_every = 1, 0
    c.rl.num_iterations = 1          # the logged loss and KL are then those before the update
    c.mesh.num_devices = num_devices
    c.mesh.update(mesh)
    grpo.train_and_evaluate(c, str(tmp_path / name))
    (row,) = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    return row


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo_one")
    return path, _run(path, "one", 1)


def test_data_parallel_over_two_devices_equals_one(one_device):
    """The entrypoint on 1 device and data-parallel over 2 (rollouts split by row, gradients
    all-reduced), compared on what one step computes before its update: the samples, their
    rewards, and the loss, KL and entropy of the starting policy.

    Parameters after the update are not compared: AdamW's first step moves an entry with a
    near-zero gradient by lr·g/(|g| + ε), up to 2·lr when rounding flips g's sign, and GRPO's
    group-centred advantages make such entries common (one run's gradient norm was 3e-5). The
    gradient itself is compared, with a bound from fp32 summation, in
    tests/rl/test_grpo_data_parallel.py."""
    path, one = one_device
    _same_step(one, _run(path, "two", 2))


def test_pipeline_stages_equal_one_device(one_device):
    """The same under fsdp_pp on 8 devices (stage 2 × fsdp 4): the update's forward runs the
    MoE stack as 2 pipeline stages, the sampler runs it unpipelined on the stage-split
    weights."""
    path, one = one_device
    _same_step(one, _run(path, "pp", 8, preset="fsdp_pp", pipeline_microbatches=2))


def _same_step(one, two):
    # The sampler draws with per-row keys from identical parameters: the same tokens.
    for key in ("reward_mean", "accuracy_reward_mean", "format_reward_mean",
                "completion_length", "truncation_rate", "zero_variance_groups"):
        assert one[key] == two[key], key
    # Entropy: a mean of positive per-token sums over B·T ≤ 16·40 positions and V = 320 ids,
    # κ = 1: at most 2·γ(960) ≈ 1.1e-4 apart.
    np.testing.assert_allclose(one["entropy"], two["entropy"], rtol=1.2e-4)
    # Before the update the policy is the old policy and the reference, so every ratio is 1 and
    # every k3 term 0 up to the rounding of two programs computing the same log-prob (|δ| ≲
    # 1e-6 for log-softmax values ≲ 10): the loss is −mean(A) + O(max|A|·δ) with mean(A) = 0
    # per group and |A| ≤ √(G−1) = 1.7, so |loss| ≲ 2e-6; with |δ| up to 4 ulps of 10
    # (3.8e-6), k3 ≈ δ²/2 ≤ 7.2e-12, computed within 16u|δ| ≈ 3.6e-12 (test_rl_parts), so
    # below 2e-11 per token. Each run is checked against 0, so both agree.
    for row in (one, two):
        assert abs(row["loss"]) < 1e-5, row["loss"]
        assert abs(row["kl"]) < 2e-11, row["kl"]
        np.testing.assert_allclose(row["ratio_mean"], 1.0, atol=1e-5)


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
    from deepseek_jax.hf import convert_to_orbax, load_hf_checkpoint
    hf = os.path.join(os.path.dirname(__file__), "..", "hf", "fixtures", "v3")
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
    # The held-out evaluation scored every one of the 8 problems: its accuracy counts them.
    after = result["after"]
    assert len(after["completions"]) == 8 and len(after["samples"]) == c.train.samples_to_show
    assert after["accuracy"] * 8 == round(after["accuracy"] * 8)
    # The policy started from the imported weights: one small update away from them at most.
    _, start = load_hf_checkpoint(hf, dtype=jnp.float32)
    _, trained = load_trained(str(tmp_path / "run"))
    assert jax.tree.structure(start["params"]) == jax.tree.structure(trained["params"])
    for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(trained["params"])):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.01     # μ·lr = 2e-3 per Adam step
    assert jax.tree.leaves(start["routing"])
    for a, b in zip(jax.tree.leaves(start["routing"]), jax.tree.leaves(trained["routing"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
