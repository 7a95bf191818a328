"""DPO end to end on the tiny model (trainers/dpo.py): the held-out metrics start exactly at the
reference, a resumed run continues the uninterrupted one with the saved reference log-probs,
8 devices match 1, LoRA keeps the starting weights; rejection sampling writes DPO pairs."""

import json
import os

import flax
import jax
import numpy as np
import pytest

from deepseek_jax.configs.dpo import get_config
from deepseek_jax.data import preference, r1, tasks
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.model import adapters
from deepseek_jax.rl import rejection
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.trainers import dpo as dpo_trainer
from numerics import gradient_rtol
from run_helpers import make_start_run


def _write_pairs(path, n=40, seed=0):
    """Arithmetic pairs in the demo's form: the worked answer against an estimate."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p = tasks.arithmetic_problem(rng, max_digits=2, min_digits=2, ops="+-")
            wrong = int(p["answer"]) + int(rng.choice([-10, -1, 1, 10]))
            f.write(json.dumps({"prompt": r1.make_prompt(p, "compact"),
                                "chosen": r1.target_completion(p, template="compact"),
                                "rejected": f" about {wrong} </think> <answer>{wrong}</answer>"})
                    + "\n")
    return str(path)


def _config(tmp_path, **train):
    c = get_config("tiny")
    c.data.path = _write_pairs(tmp_path / "pairs.jsonl")
    c.data.validation_fraction = 0.2
    c.optim.schedule = "constant"          # so a run cut in two follows the same schedule
    for k, v in train.items():
        c.train[k] = v
    return c


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_dpo_run_resumes_where_it_stopped(tmp_path):
    c = _config(tmp_path, steps=6, eval_every=3, checkpoint_every=3)
    whole = str(tmp_path / "whole")
    result = dpo_trainer.train_and_evaluate(c, whole)
    # Step 0's held-out metrics are the policy against itself, by the same program: every
    # margin is exactly 0, so no pair counts as right and the loss is log 2 (−log σ(0) in fp32).
    before = result["before"]
    assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.0
    assert abs(before["loss"] - np.log(2)) < 1e-6
    assert [r["step"] for r in _rows(whole) if "eval_loss" in r] == [0, 3, 6]
    assert all(np.isfinite(r["loss"]) for r in _rows(whole) if "loss" in r)

    # The same run cut at step 3 and rerun to 6: the rerun reads the reference log-probs from
    # the checkpoint and repeats the uninterrupted steps (same programs, inputs and batches on
    # one machine: bit for bit).
    cut = str(tmp_path / "cut")
    dpo_trainer.train_and_evaluate(_config(tmp_path, steps=3, eval_every=3,
                                           checkpoint_every=3), cut)
    dpo_trainer.train_and_evaluate(c, cut)
    pick = lambda rows: [(r["step"], r["loss"], r["grad_norm"]) for r in rows   # noqa: E731
                         if "grad_norm" in r]
    assert pick(_rows(cut)) == pick(_rows(whole))

    # Rerun on other pairs: the saved reference no longer matches, and the run says so.
    c.data.path = _write_pairs(tmp_path / "other.jsonl", n=45)
    with pytest.raises(ValueError, match="the pairs changed since this run started"):
        dpo_trainer.train_and_evaluate(c, cut)


def test_eight_devices_match_one(tmp_path):
    """fsdp_ep on 8 devices against dp on 1: the same held-out log-probs at step 0 and the
    same first gradient norm (the first step's loss is log 2 on both)."""
    runs = {}
    for preset, devices in (("dp", 1), ("fsdp_ep", 8)):
        c = _config(tmp_path, steps=1, eval_every=1, checkpoint_every=1)
        c.mesh.preset, c.mesh.num_devices = preset, devices
        runs[preset] = dpo_trainer.train_and_evaluate(c, str(tmp_path / preset))
    one, many = runs["dp"], runs["fsdp_ep"]
    # Log-probs: sums over ≤ 40 targets of per-token values ≈ 6 nats computed under another
    # sharding, each with a few ulps of error: ≲ 1e-5 relative.
    for k in ("logp_chosen", "logp_rejected"):
        np.testing.assert_allclose(many["before"][k], one["before"][k], rtol=1e-5)
    # The gradient norm: each entry a sum over 2·8·64 positions in another order; κ ≤ 20 as in
    # the other sharded-parity tests.
    np.testing.assert_allclose(many["last"]["grad_norm"], one["last"]["grad_norm"],
                               rtol=gradient_rtol(2 * 8 * 64, 20.0))


def test_lora_dpo_keeps_the_starting_weights(tmp_path):
    path = str(tmp_path / "start")
    (state,) = make_start_run(path, [7], first_step=2)

    c = _config(tmp_path, steps=4, eval_every=4, checkpoint_every=4)
    c.init.pretrain_dir = path
    c.adapter.rank, c.adapter.targets = 4, "attention,mlp"
    c.optim.lr = 1e-2
    workdir = str(tmp_path / "lora")
    result = dpo_trainer.train_and_evaluate(c, workdir)
    # The reference is the policy with its adapters off: with fresh adapters (B = 0) that is
    # the same model by another compiled program, a few ulps of the ≈ 200-nat sides apart.
    assert abs(result["before"]["reward_margin"]) < 1e-5
    assert result["after"]["reward_margin"] > 0.0     # the adapters learned the preference
    lora_config, saved = ckpt.load_trained(workdir)
    trained, frozen = adapters.split(saved["params"], lora_config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 frozen, jax.device_get(state.params))
    assert any(np.any(np.asarray(x)) for k, x in
               flax.traverse_util.flatten_dict(trained).items() if k[-1].endswith("_b"))


def test_bad_input_fails_before_any_compile(tmp_path):
    c = _config(tmp_path)
    c.dpo.loss_type = "kto"
    with pytest.raises(ValueError, match="dpo.loss_type='kto'"):
        dpo_trainer.train_and_evaluate(c, str(tmp_path / "a"))
    c = _config(tmp_path)
    c.data.global_batch, c.train.microbatches = 8, 3
    with pytest.raises(ValueError, match="not divisible by train.microbatches=3"):
        dpo_trainer.train_and_evaluate(c, str(tmp_path / "b"))
    c = _config(tmp_path)
    c.data.seq_len = 4                 # no response survives the cut
    with pytest.raises(ValueError, match="raise data.seq_len"):
        dpo_trainer.train_and_evaluate(c, str(tmp_path / "c"))


# --- rejection sampling into pairs -----------------------------------------------------------

ENCODER = Encoder(None, add_bos=True)


def test_rejection_sampling_writes_dpo_pairs(tmp_path):
    """K = 4 completions a problem: right and worked out, wrong, right but estimated, and the
    first again. Distinct accepted ones pair with distinct rejected ones, one pair here."""
    rng = np.random.default_rng(0)
    problems = [tasks.arithmetic_problem(rng, max_digits=2, min_digits=2, ops="+-")
                for _ in range(5)]

    def sample(prompts, keys):
        texts = {0: lambda p: r1.target_completion(p, template="compact"),
                 1: lambda p: " oops </think> <answer>-1</answer>",
                 2: lambda p: f" {p['answer']} </think> <answer>{p['answer']}</answer>",
                 3: lambda p: r1.target_completion(p, template="compact")}
        return [list(ENCODER(texts[j](problems[i]))) for i, j in keys]

    out = str(tmp_path / "pairs.jsonl")
    result = rejection.rejection_sample(problems, sample, out=out, k=4, template="compact",
                                        encoder=ENCODER, batch_prompts=2, keep="pairs",
                                        report=lambda s: None)
    assert result["kept"] == 5 and result["accepted"] == 15
    records = [json.loads(line) for line in open(out)]
    for r, p in zip(records, problems):
        assert r["chosen"] == r1.target_completion(p, template="compact")
        assert r["rejected"] == " oops </think> <answer>-1</answer>"
    # DPO reads the file back; each side renders to the sampled row (bos + prompt + completion
    # + eos under the byte template).
    rows = preference.pair_rows(preference.load_pairs(out),
                                preference.chat.BYTE_CHAT_TEMPLATE, Encoder(None), seq_len=96)
    first = records[0]
    want = ENCODER.encode_prompt(first["prompt"]) + list(ENCODER(first["chosen"]))[1:]
    np.testing.assert_array_equal(rows.arrays["tokens"][0, 0, :len(want)], want)
