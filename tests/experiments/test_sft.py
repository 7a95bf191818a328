"""SFT end to end on the tiny model (trainers/sft.py), packed-vs-unpacked loss parity, and
rejection sampling (rl/rejection.py) into SFT-ready JSONL."""

import json
import os

import flax
import jax
import numpy as np
import pytest

from deepseek_jax.configs.pretrain import to_model_config
from deepseek_jax.configs.sft import get_config
from deepseek_jax.data import chat, r1, sft, tasks
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.model import adapters
from deepseek_jax.rl import rejection
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import eval_step, init_train_state
from deepseek_jax.trainers import sft as sft_trainer
from run_helpers import make_start_run


def _problems(n, seed=0):
    rng = np.random.default_rng(seed)
    return [tasks.arithmetic_problem(rng, max_digits=2, min_digits=2, ops="+-") for _ in range(n)]


def _write_conversations(path, n=96):
    with open(path, "w") as f:
        for p in _problems(n):
            f.write(json.dumps({"prompt": r1.make_prompt(p, "compact"),
                                "completion": r1.target_completion(p, template="compact")}) + "\n")
    return str(path)


def test_packed_and_unpacked_rows_give_the_same_loss(tiny):
    """The loss is a token mean over the trained targets, so packing must not change it: the
    same samples one per row and packed several per row, through the model in fp32."""
    rng = np.random.default_rng(0)
    samples = []
    for n in rng.integers(5, 20, size=12):
        mask = (np.arange(n) >= rng.integers(1, n - 2)).astype(np.float32)   # a trained tail
        samples.append(chat.Sample(rng.integers(3, tiny.vocab_size, n).astype(np.int32), mask,
                                   "s"))
    packed = sft.pack_samples(samples, seq_len=48, pad_id=2).arrays
    single = sft.pack_samples(samples, seq_len=48, pad_id=2, pack=False).arrays
    assert len(packed["tokens"]) < len(single["tokens"]) == 12
    assert sft.trained_tokens(packed) == sft.trained_tokens(single)
    state = init_train_state(jax.random.key(0), tiny, make_optimizer(1e-3))
    loss = jax.jit(lambda b: eval_step(state, b, config=tiny))
    a, b = jax.device_get(loss(packed)), jax.device_get(loss(single))
    # Per token, the two layouts differ only in fp32 rounding (masked keys add exact zeros to
    # the softmax; the same contractions run over other batch shapes): ≲ 1e-6 relative per
    # log-prob. The means sum N ≤ 12·19 = 228 terms, whose fp32 rounding is at most N·u =
    # 228 · 6e-8 ≈ 1.4e-5 relative; 2e-5 bounds both.
    for name in ("lm_loss", "mtp_loss"):
        np.testing.assert_allclose(a[name], b[name], rtol=2e-5)
    assert abs(float(a["lm_loss"]) - np.log(tiny.vocab_size)) < 0.5     # a random model: ≈ log V


@pytest.fixture(scope="module")
def start_run(tmp_path_factory):
    """A run directory as pretraining leaves it: model_config.json and an Orbax checkpoint."""
    path = str(tmp_path_factory.mktemp("pretrained"))
    (state,) = make_start_run(path, [7], first_step=3)
    return path, state


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, start_run):
    tmp = tmp_path_factory.mktemp("sft")
    c = get_config("tiny")
    c.init.pretrain_dir = start_run[0]
    c.data.path = _write_conversations(tmp / "conv.jsonl")
    c.data.validation_fraction = 0.1
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 8, 4, 4
    result = sft_trainer.train_and_evaluate(c, str(tmp / "run"))
    return c, str(tmp / "run"), result


def test_tiny_sft_run_learns_the_assistant_tokens(sft_run, start_run):
    c, workdir, result = sft_run
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [(r["step"], r["eval_lm_loss"]) for r in rows if "eval_lm_loss" in r]
    assert [s for s, _ in evals] == [0, 4, 8]
    # Held-out assistant-token loss falls: 8 Adam steps at lr 3e-3 move a random model's
    # log V ≈ 5.77 nats well down on digits and tags (observed ≈ 1 nat; 0.3 leaves margin).
    assert evals[-1][1] < evals[0][1] - 0.3, evals
    assert [r["step"] for r in rows if "lm_loss" in r] == list(range(1, 9))

    # Step 0's held-out loss is the starting run's parameters on the held-out assistant tokens,
    # computed here independently: one unsharded batch of every held-out row.
    _, held = sft.rows_from_config(c.data, Encoder(None))
    model_config = to_model_config(c.model)
    loss = eval_step(start_run[1], held.arrays, config=model_config)
    # Same sums, other batching and sharding: fp32 rounding of means over ≲ 300 tokens.
    np.testing.assert_allclose(result["before"]["lm_loss"], float(loss["lm_loss"]), rtol=5e-5)

    # Rerunning the finished run resumes and changes nothing.
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    sft_trainer.train_and_evaluate(c, workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_lora_sft_then_grpo_from_its_run(tmp_path, start_run):
    """SFT with LoRA adapters from a run, resumed; then GRPO from that run, with adapters of its
    own and β > 0 (reference = the policy with its adapters off)."""
    c = get_config("tiny")
    c.init.pretrain_dir = start_run[0]
    c.data.path = _write_conversations(tmp_path / "conv.jsonl")
    c.data.validation_fraction = 0.1
    c.adapter.rank, c.adapter.targets = 4, "attention,mlp"
    c.optim.lr = 1e-2            # adapters take a larger step than full fine-tuning (3e-3)
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 16, 16, 8
    workdir = str(tmp_path / "lora_sft")
    result = sft_trainer.train_and_evaluate(c, workdir)
    # 16 steps of the adapters alone: 5.80 → 5.45 nats here (full fine-tuning: ~1 nat in 8).
    assert result["after"]["lm_loss"] < result["before"]["lm_loss"] - 0.2
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    sft_trainer.train_and_evaluate(c, workdir)                            # resumes, finished
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before

    # The checkpoint: the starting weights untouched beside the trained adapters.
    lora_config, saved = ckpt.load_trained(workdir)
    assert lora_config.adapter_rank == 4
    trained, frozen = adapters.split(saved["params"], lora_config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 frozen, jax.device_get(start_run[1].params))
    assert any(np.any(np.asarray(x)) for k, x in
               flax.traverse_util.flatten_dict(trained).items() if k[-1].endswith("_b"))
    # Read merged, it is the plain model with W + s·A·B (model/adapters.py tests the merge).
    plain_config, merged = ckpt.load_trained(workdir, merged=True)
    assert plain_config == to_model_config(c.model)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 merged["params"], adapters.merge(saved["params"], lora_config))

    from deepseek_jax.configs.grpo import get_config as grpo_config
    from deepseek_jax.trainers import grpo
    g = grpo_config("tiny")
    g.init.pretrain_dir = workdir
    g.data.num_train, g.data.num_eval = 300, 20
    g.data.data_dir = str(tmp_path / "data")
    g.adapter.rank, g.adapter.targets = 2, "attention.w_o,experts"
    g.adapter.frozen_dtype = "bfloat16"
    g.rl.beta, g.rl.num_iterations = 0.04, 1
    g.train.steps, g.train.eval_every = 1, 0
    grpo.train_and_evaluate(g, str(tmp_path / "lora_grpo"))
    (row,) = [json.loads(line) for line in open(tmp_path / "lora_grpo" / "metrics.jsonl")]
    # With μ = 1 the logged KL is the starting policy's: fresh adapters (B = 0) on the merged
    # SFT weights, against the same weights with the adapters off. Two compiled fp32 programs
    # give log-probs a few ulps apart (|d| ≲ 1e-5 nats), so k3 ≈ d²/2 ≲ 5e-11. (The random
    # tiny model earns no reward, so its update is zero: trained adapters in the rollouts are
    # tested in tests/train/test_adapter_training.py.)
    assert abs(row["kl"]) < 1e-9, row["kl"]
    assert row["sampler_trainer_logp_gap"] < 1e-4 and np.isfinite(row["loss"])
    grpo_config_saved, policy = ckpt.load_trained(str(tmp_path / "lora_grpo"))
    assert grpo_config_saved.adapter_targets == ("attention.w_o", "experts")
    trained, frozen = adapters.split(policy["params"], grpo_config_saved)
    assert {x.dtype for x in jax.tree.leaves(trained)} == {np.dtype("float32")}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), np.asarray(b.astype(jax.numpy.bfloat16))), frozen, merged["params"])


def test_lora_checkpoints_hold_the_adapters_only(tmp_path):
    """A LoRA run's checkpoints leave the frozen weights out and read them back from the
    recorded step of the run it started from, even after that run saved a newer step; with that
    step gone, reading says so; adapter.save_frozen=True writes them in."""
    start = str(tmp_path / "start")
    first, *_ = make_start_run(start, [7])
    c = get_config("tiny")
    c.init.pretrain_dir = start
    c.data.path = _write_conversations(tmp_path / "conv.jsonl")
    c.data.validation_fraction = 0.1
    c.adapter.rank, c.adapter.targets = 4, "attention.w_o,mlp"
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 4, 0, 2
    workdir = str(tmp_path / "lora")
    sft_trainer.train_and_evaluate(c, workdir)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), save_every=1, keep=2,
                                async_save=False)
    saved = flax.traverse_util.flatten_dict(ckpt.saved_params(manager))
    manager.close()
    assert saved and all(adapters.is_adapter(k) for k in saved), sorted(saved)[:3]
    assert ckpt.load_start(workdir) == (start, 1)

    # The starting run moves on (a newer step, other weights); the LoRA run still reads step 1.
    make_start_run(start, [8], first_step=2)
    c.train.steps = 6
    sft_trainer.train_and_evaluate(c, workdir)                   # resumes from step 4
    lora_config, params = ckpt.load_trained(workdir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 adapters.split(params["params"], lora_config)[1], jax.device_get(first.params))

    # Step 1 of the starting run removed: the error names the run, the step and the way out.
    import shutil
    shutil.rmtree(os.path.join(start, "checkpoints", "1"))
    with pytest.raises(FileNotFoundError, match=r"at step 1, .* that checkpoint is gone"):
        ckpt.load_trained(workdir, merged=True)

    c.adapter.save_frozen, c.train.steps = True, 2
    whole = str(tmp_path / "whole")
    sft_trainer.train_and_evaluate(c, whole)          # from the starting run's step 2 now
    manager = ckpt.make_manager(os.path.join(whole, "checkpoints"), save_every=1, keep=2,
                                async_save=False)
    assert ckpt.holds_frozen(ckpt.saved_params(manager))
    manager.close()
    shutil.rmtree(os.path.join(start, "checkpoints"))
    ckpt.load_trained(whole, merged=True)             # reads without the starting run


def test_bad_conversations_fail_before_any_compile(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    c = get_config("tiny")
    c.data.path = str(path)
    with pytest.raises(chat.ChatError, match=f"{path}:2: the conversation has no assistant"):
        sft_trainer.train_and_evaluate(c, str(tmp_path / "run"))
    c.data.path = ""
    with pytest.raises(ValueError, match="exactly one of data.path"):
        sft_trainer.train_and_evaluate(c, str(tmp_path / "run"))


# --- rejection sampling ----------------------------------------------------------------------

ENCODER = Encoder(None, add_bos=True)


def scripted_sampler(problems, fail_after=None):
    """Completions keyed by (problem, sample): j = 0 right and worked out, j = 1 wrong, j = 2
    right but estimated in the think block (shorter), j = 3 the same text as j = 0."""
    calls = []

    def sample(prompts, keys):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("interrupted")
        calls.append(keys)
        out = []
        for i, j in keys:
            p = problems[i]
            text = {0: r1.target_completion(p, template="compact"),
                    1: " oops </think> <answer>-1</answer>",
                    2: f" {p['answer']} </think> <answer>{p['answer']}</answer>",
                    3: r1.target_completion(p, template="compact")}[j % 4]
            out.append(list(ENCODER(text)))                     # ends with eos, as sampled
        return out
    sample.calls = calls
    return sample


@pytest.mark.parametrize("keep, per_problem", [("all", 3), ("unique", 2), ("shortest", 1)])
def test_rejection_keeps_what_the_rewards_accept(tmp_path, keep, per_problem):
    problems = _problems(5)
    out = str(tmp_path / "out.jsonl")
    result = rejection.rejection_sample(problems, scripted_sampler(problems), out=out, k=4,
                                        template="compact", encoder=ENCODER, batch_prompts=2,
                                        keep=keep, report=lambda s: None)
    assert result == {"problems": 5, "sampled": 20, "accepted": 15, "kept": 5 * per_problem,
                      "problems_with_sample": 5}
    records = [json.loads(line) for line in open(out)]
    assert [r["index"] for r in records] == [i for i in range(5) for _ in range(per_problem)]
    if keep == "shortest":
        assert all(r["completion"].startswith(f" {r['problem']['answer']} ") for r in records)
    # SFT reads the file back, and the byte template renders each record to the sampled row.
    (conv, *_) = chat.load_conversations(out)
    (s, *_) = chat.tokenize_conversation(conv, chat.BYTE_CHAT_TEMPLATE, Encoder(None))
    first = records[0]
    np.testing.assert_array_equal(s.tokens, ENCODER.encode_prompt(first["prompt"]) +
                                  list(ENCODER(first["completion"]))[1:])


def test_rejection_sampling_resumes(tmp_path):
    problems = _problems(7)
    args = dict(k=4, template="compact", encoder=ENCODER, batch_prompts=3,
                report=lambda s: None)
    whole = str(tmp_path / "whole.jsonl")
    rejection.rejection_sample(problems, scripted_sampler(problems), out=whole, **args)
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(RuntimeError, match="interrupted"):
        rejection.rejection_sample(problems, scripted_sampler(problems, fail_after=1), out=out,
                                   **args)
    with open(out, "a") as f:          # a batch whose samples were written, progress not
        f.write(json.dumps({"prompt": "x", "completion": "y", "index": 5}) + "\n")
    rerun = scripted_sampler(problems)
    result = rejection.rejection_sample(problems, rerun, out=out, **args)
    assert open(out).read() == open(whole).read()
    assert result["problems"] == 7 and result["kept"] == 21
    assert sorted({i for keys in rerun.calls for i, _ in keys}) == [3, 4, 5, 6]
    again = scripted_sampler(problems, fail_after=0)  # nothing left: never called
    rejection.rejection_sample(problems, again, out=out, **args)


def test_rejection_sampling_from_a_run(sft_run, tmp_path):
    """The command's path: a run's checkpoint, the task of a GRPO run config, the sampler."""
    from deepseek_jax.configs.grpo import get_config as grpo_config
    _, workdir, _ = sft_run
    c = grpo_config("tiny")
    c.data.data_dir = str(tmp_path / "data")
    c.data.num_train, c.data.num_eval = 40, 8
    out = str(tmp_path / "rej.jsonl")
    kw = dict(out=out, k=2, num_problems=6, batch_prompts=4, require_format=False)
    result = rejection.from_run(workdir, c, **kw)
    assert result["problems"] == 6 and result["sampled"] == 12
    batches = [json.loads(line) for line in open(rejection.progress_path(out))]
    assert [b["problems"] for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert rejection.from_run(workdir, c, **kw) == result            # resumed: nothing to do
    with pytest.raises(ValueError, match="keep="):
        rejection.from_run(workdir, c, **{**kw, "keep": "best"})
    bad = tmp_path / "problems.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "op": "+"}) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:1: missing \['answer'\]"):
        rejection.from_run(workdir, c, **{**kw, "problems_file": str(bad)})



def test_rejection_sampling_reads_math_problem_files(tmp_path):
    """A GSM8K-style file: each problem is prompted with its question in the template, and a
    completion is kept when math-verify finds its answer equal to the reference in any form
    ("29.0" for 29), not when it is another number."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "rl", "fixtures",
                        "gsm8k_sample.jsonl")
    problems = rejection.load_problem_file(path)
    assert problems[0]["reference"] == "29" and problems[0]["id"] == "line 1"
    prompts_seen = []

    def sample(prompts, keys):
        prompts_seen.extend(ENCODER.decode(p) for p in prompts)
        answers = {0: lambda p: p["reference"] + ".0", 1: lambda p: p["reference"] + "1"}
        return [list(ENCODER(f" ok </think> <answer>{answers[j](problems[i])}</answer>"))
                for i, j in keys]

    out = str(tmp_path / "math.jsonl")
    result = rejection.rejection_sample(problems, sample, out=out, k=2, template="compact",
                                        encoder=ENCODER, batch_prompts=4, report=lambda s: None)
    assert result["accepted"] == len(problems) and result["kept"] == len(problems)
    assert problems[0]["question"] in prompts_seen[0]
    records = [json.loads(line) for line in open(out)]
    assert all(r["completion"].endswith(f"{r['problem']['reference']}.0</answer>")
               for r in records)
