"""GRPO's pure parts: advantages, loss aggregation, clipping, KL, rewards and prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.data import r1, tasks
from deepseek_jax.rl import advantages as adv_lib
from deepseek_jax.rl import loss as loss_lib
from deepseek_jax.rl import rewards
from deepseek_jax.sampling import sample


# --- advantages -------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    r = [1.0, 0.0, 0.0, 1.0,   0.5, 0.5, 0.5, 0.5]     # two groups of 4
    a = np.asarray(adv_lib.group_advantages(r, 4, "group", eps=0.0))
    # Group 1: mean 0.5, population std 0.5 → ±1. Group 2: all equal → exactly 0.
    np.testing.assert_allclose(a, [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-6)
    assert float(adv_lib.zero_variance_fraction(r, 4)) == 0.5


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_despite_rounding(scale):
    # Eight format-only rewards of 0.1: their fp32 mean is not exactly 0.1, and dividing the
    # rounding residue by a rounding-sized std once gave every member the same ~0.01 advantage.
    r = [0.1] * 8 + [1.1] + [0.1] * 7
    a = np.asarray(adv_lib.group_advantages(r, 8, scale))
    assert np.all(a[:8] == 0.0)
    assert a[8] > 0 and np.all(a[9:] < 0)


def test_advantage_scalings():
    r = np.array([3.0, 1.0, 2.0, 2.0])
    none = np.asarray(adv_lib.group_advantages(r, 2, "none"))
    np.testing.assert_allclose(none, [1, -1, 0, 0])
    batch = np.asarray(adv_lib.group_advantages(r, 2, "batch", eps=0.0))
    np.testing.assert_allclose(batch, np.array([1, -1, 0, 0]) / r.std(), rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        adv_lib.group_advantages(r, 3)
    with pytest.raises(ValueError, match="use one of"):
        adv_lib.group_advantages(r, 2, "rank")


# --- loss ---------------------------------------------------------------------------------------

def _ragged(seed=0, B=4, T=7):
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 3, 1, 5])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return rng.standard_normal((B, T)).astype(np.float32), mask


@pytest.mark.parametrize("how", loss_lib.AGGREGATIONS)
def test_aggregations_against_numpy(how):
    x, mask = _ragged()
    got = float(loss_lib.aggregate(jnp.asarray(x), jnp.asarray(mask), how, max_len=7))
    if how == "token_mean":
        want = (x * mask).sum() / mask.sum()
    elif how == "seq_mean_token_mean":
        want = np.mean([(x[i] * mask[i]).sum() / mask[i].sum() for i in range(4)])
    else:
        want = np.mean([(x[i] * mask[i]).sum() / 7 for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ratio_one_gives_minus_advantage_and_the_policy_gradient():
    """On-policy (old = current): per-token loss −A, gradient −A·∇logp (the REINFORCE form)."""
    logp = jnp.array([[-1.0, -2.0], [-0.5, -0.3]])
    adv = jnp.array([2.0, -1.0])
    mask = jnp.ones((2, 2))
    loss, m = loss_lib.grpo_loss(logp, jax.lax.stop_gradient(logp), adv, mask,
                                 aggregation="token_mean")
    assert float(loss) == pytest.approx(-(2 * 2 + -1 * 2) / 4)
    g = jax.grad(lambda lp: loss_lib.grpo_loss(lp, jax.lax.stop_gradient(lp), adv, mask,
                                               aggregation="token_mean")[0])(logp)
    np.testing.assert_allclose(np.asarray(g), -np.array([[2, 2], [-1, -1]]) / 4, rtol=1e-6)
    assert float(m["kl"]) == 0.0


def test_clipping():
    """ρ = e^{0.5} ≈ 1.65 with A > 0 is clipped at 1 + ε_high (no gradient); with A < 0 the
    unclipped term is smaller, so it stays (gradient flows). ρ = e^{−0.5} ≈ 0.61 mirrors that."""
    old = jnp.zeros((4, 1))
    logp = jnp.array([[0.5], [0.5], [-0.5], [-0.5]])
    adv = jnp.array([1.0, -1.0, 1.0, -1.0])
    mask = jnp.ones((4, 1))
    f = lambda lp: loss_lib.grpo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28,
                                      aggregation="token_mean")
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(logp)
    r_hi, r_lo = np.exp(0.5), np.exp(-0.5)
    want = [-1.28, r_hi, -r_lo, 0.8]      # −min(ρA, clip(ρ)A) per row
    assert float(loss) == pytest.approx(np.mean(want), rel=1e-5)
    np.testing.assert_allclose(np.asarray(g)[:, 0], [0, r_hi / 4, -r_lo / 4, 0], rtol=1e-5)
    assert float(m["clip_high_frac"]) == 0.25 and float(m["clip_low_frac"]) == 0.25


def test_k3_kl_is_accurate_near_the_reference():
    # d = ref − logp exact in fp32 (logp = 0); the float64 value is the reference. XLA's expm1
    # (tanh(d/2)·(e^d + 1) for |d| ≤ 0.5, e^d − 1 above) is within its tanh approximation's
    # error plus three roundings of expm1(d) (6.3u at worst over 2M draws on one host, u = 2⁻²⁴;
    # 16u allows for another CPU's vectorization of it), and the subtraction adds u·k3:
    # |error| ≤ 16u·|expm1(d)| + u·k3. e^d − d − 1 misses this by up to u absolute (e^d rounds
    # near 1): 6·10⁴ times the bound at d = 1e-6.
    d = np.array([1e-7, -3e-7, 1e-6, -1e-5, 1e-4, -1e-3, 1e-2, -0.1, 0.5, -2.0, 5.0], np.float32)
    got = np.asarray(loss_lib.kl_k3(jnp.zeros((1, d.size)), jnp.asarray(d)[None]))[0]
    d64 = d.astype(np.float64)
    want = np.expm1(d64) - d64
    u = 2.0**-24
    bound = 16 * u * np.abs(np.expm1(d64)) + u * want
    assert np.all(np.abs(got - want) <= bound), (got - want) / bound


def test_k3_kl():
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -2.0]])
    d = -0.5
    np.testing.assert_allclose(np.asarray(loss_lib.kl_k3(logp, ref)),
                               [[np.exp(d) - d - 1, 0.0]], rtol=1e-6)
    assert np.all(np.asarray(loss_lib.kl_k3(logp, logp)) == 0)
    loss, m = loss_lib.grpo_loss(logp, logp, jnp.zeros(1), jnp.ones((1, 2)), ref_logp=ref,
                                 beta=0.5, aggregation="token_mean")
    assert float(loss) == pytest.approx(0.5 * (np.exp(d) - d - 1) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        loss_lib.grpo_loss(logp, logp, jnp.zeros(1), jnp.ones((1, 2)), beta=0.1)


def test_token_logprobs_with_temperature():
    logits = jnp.array([[[1.0, 2.0, 0.5]]])
    got = float(sample.token_logprobs(logits, jnp.array([[1]]), 0.7)[0, 0])
    z = np.array([1.0, 2.0, 0.5]) / 0.7
    assert got == pytest.approx(z[1] - np.log(np.exp(z).sum()), rel=1e-6)


# --- rewards ------------------------------------------------------------------------------------

CD = {"numbers": [3, 7, 25, 50], "target": 79, "prompt": "numbers 3 7 25 50 target 79",
      "answer": "50+25+7-3"}
AR = {"prompt": "417+85=", "answer": "502", "op": "+", "numbers": [417, 85], "target": 502}


@pytest.mark.parametrize("completion, acc, fmt", [
    (" add them </think> <answer>50+25+7-3</answer>", 1.0, 1.0),
    (" </think> <answer> (50+25)+7-3 </answer>\n", 1.0, 1.0),
    (" </think> <answer>50+25+7+3-3-3</answer>", 0.0, 1.0),         # 3 used three times
    (" </think> <answer>50+25+7-3-3</answer>", 0.0, 1.0),           # reused number
    (" </think> <answer>79</answer>", 0.0, 1.0),                    # no numbers used
    (" </think> <answer>50/(3-3)+79</answer>", 0.0, 1.0),           # division by zero
    (" </think> <answer>3**4-7+25-50+... </answer>", 0.0, 1.0),     # ** and junk
    (" </think> <answer>__import__('os')</answer>", 0.0, 1.0),      # never executed
    (" </think> <answer>99999999*99999999*99999999</answer>", 0.0, 1.0),  # huge values
    (" </think> <answer>1</answer> <answer>50+25+7-3</answer>", 1.0, 0.0),  # several: last counts
    (" </think> <answer>50+25+7-3</answer> <answer>1</answer>", 0.0, 0.0),
    (" no tags at all 50+25+7-3", 0.0, 0.0),
    (" </think> <answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>", 0.0, 1.0),  # too long
])
def test_countdown_reward_edge_cases(completion, acc, fmt):
    # Completions of a prompt that prefilled "<think>", scored with TinyZero's format weight.
    s = rewards.score(completion, CD, format_weight=0.1, template="r1_zero_think")
    assert (s["accuracy"], s["format"]) == (acc, fmt)
    assert s["total"] == pytest.approx(acc + 0.1 * fmt)


def test_arithmetic_reward():
    assert rewards.score(" 417+85 </think> <answer>502</answer>", AR)["accuracy"] == 1.0
    assert rewards.score(" </think> <answer>-502</answer>", AR)["accuracy"] == 0.0
    assert rewards.score(" </think> <answer>5e2</answer>", AR)["accuracy"] == 0.0
    neg = {"prompt": "12-85=", "answer": "-73", "op": "-"}
    assert rewards.score(" </think> <answer>-73</answer>", neg)["accuracy"] == 1.0


def test_prompts_and_target_completion_score_full_marks():
    rng = np.random.default_rng(0)
    for problem in [tasks.countdown_problem(rng) for _ in range(20)] + [CD, AR]:
        for template in r1.TEMPLATES:
            prompt = r1.make_prompt(problem, template)
            assert prompt.endswith("<think>") == r1.prefills_think(template)
            completion = r1.target_completion(problem, template=template)
            s = rewards.score(completion, problem, template=template)
            assert s == {"accuracy": 1.0, "format": 1.0, "total": 2.0}
    assert r1.make_prompt(CD).startswith("A conversation between User and Assistant.")
    with pytest.raises(ValueError, match="template"):
        r1.make_prompt(CD, "chatml")


def test_worked_completions_score_full_marks_and_fraction_holds():
    rng = np.random.default_rng(1)
    problems = [tasks.arithmetic_problem(rng, 2, "+-", 2) for _ in range(2000)]
    for p in problems[:50]:
        worked = r1.target_completion(p, worked=True)
        assert worked != r1.target_completion(p)
        assert rewards.score(worked, p) == {"accuracy": 1.0, "format": 1.0, "total": 2.0}
    # The hash picks close to the asked share (binomial sd over 2000 draws ≈ 0.01).
    share = np.mean([r1.chosen(p, 0.3) for p in problems])
    assert abs(share - 0.3) < 0.04
    assert not any(r1.chosen(p, 0.0) for p in problems)
    assert all(r1.chosen(p, 1.0) for p in problems)
    # Countdown has no column arithmetic: the restating think block is kept.
    assert r1.target_completion(CD, worked=True) == r1.target_completion(CD)


def test_r1_zero_is_the_papers_template_and_rewards():
    # R1 Table 1: the prompt ends with "Assistant:" and the model opens <think> itself; §2.2.2:
    # accuracy and format rewards, added.
    prompt = r1.make_prompt(AR)
    assert prompt.endswith("User: What is 417+85?. Assistant:")
    assert r1.make_prompt(AR, "r1_zero_think") == prompt + " <think>"
    assert r1.make_prompt(AR, "compact") == "What is 417+85? <think>"
    assert not r1.prefills_think("r1_zero") and r1.prefills_think("r1_zero_think")
    opened = " <think> 417+85=502 </think> <answer>502</answer>"
    assert rewards.score(opened, AR) == {"accuracy": 1.0, "format": 1.0, "total": 2.0}
    # Without its own <think> a completion of the paper's prompt is not well formed...
    assert rewards.score(opened.replace(" <think>", ""), AR)["format"] == 0.0
    # ...and after a prefilled <think> a second one is not either.
    assert rewards.score(opened, AR, template="r1_zero_think")["format"] == 0.0
    assert rewards.score(opened.replace(" <think>", ""), AR, template="compact")["format"] == 1.0
    assert rewards.FORMAT_WEIGHTS == {"r1": 1.0, "tinyzero": 0.1, "accuracy_only": 0.0}
    assert rewards.score(opened, AR, rewards.FORMAT_WEIGHTS["tinyzero"])["total"] == 1.1


def test_sft_text_is_the_same_text_under_both_r1_templates():
    for estimate in (0.0, 1.0):
        texts = {t: r1.sft_text(AR, t, estimate_fraction=estimate)
                 for t in ("r1_zero", "r1_zero_think")}
        assert texts["r1_zero"] == texts["r1_zero_think"]
        assert "Assistant: <think> " in texts["r1_zero"]


# --- the run's problems and rollout metrics ---------------------------------------------------

def test_problems_are_seeded_grouped_and_fit_their_rows(tmp_path):
    from deepseek_jax.configs.grpo import get_config
    from deepseek_jax.rl import rollout
    from deepseek_jax.rl.problems import load_problems
    data = get_config("tiny").data
    data.update(num_train=64, num_eval=8)
    load = lambda seed: load_problems(data, str(tmp_path), seed=seed, num_eval=5,
                                      max_new_tokens=12, encoder=rollout.BYTES)
    a, b, c = load(0), load(0), load(1)
    assert len(a.held_out) == 5 and sorted(a.order) == list(range(64))
    group = a.for_step(3, per_step=2, group_size=4)
    assert [p["text"] for p in group] == [p["text"] for p in b.for_step(3, 2, 4)]
    assert len(group) == 8 and all(group[i] == group[i - i % 4] for i in range(8))
    assert [p["text"] for p in c.for_step(3, 2, 4)] != [p["text"] for p in group]
    # Steps past the end wrap around the same order.
    assert a.for_step(32, 2, 1) == a.for_step(0, 2, 1)
    # Every prompt (train and held out) plus a full completion fits a row.
    prompts = rollout.encode_prompts([*a.for_step(0, 64, 1), *a.held_out], data.template)
    assert max(map(len, prompts)) + 12 <= a.row_len


def test_rollout_metrics_hand_computed():
    from deepseek_jax.rl import rollout
    scores = {"total": np.array([1.1, 0.1, 0.1, 0.1], np.float32),
              "accuracy": np.array([1.0, 0.0, 0.0, 0.0], np.float32),
              "format": np.array([1.0, 1.0, 1.0, 1.0], np.float32)}
    eos = 2
    completions = [[5, eos], [5, 6, 7], [5, 6, eos], [5]]
    lengths = np.array([2, 3, 3, 1])
    rows = {"mask": np.array([[1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]], np.float32),
            "sampler_logp": np.full((4, 3), -1.0, np.float32)}
    old = np.full((4, 3), -1.0, np.float32)
    old[1, 2] = -1.25                 # the largest gap at a masked position
    old[2, 0] = -9.0                  # outside the mask: not counted
    m = rollout.rollout_metrics(scores, completions, lengths, rows, old, group_size=2,
                                max_new_tokens=3, eos_id=eos)
    assert m["reward_mean"] == pytest.approx(0.35) and m["accuracy_reward_mean"] == 0.25
    assert m["format_reward_std"] == 0.0
    assert m["zero_variance_groups"] == 0.5          # the second group's rewards are equal
    assert m["completion_length"] == 2.25
    assert m["truncation_rate"] == 0.25              # only [5, 6, 7] hit 3 tokens without EOS
    assert m["sampler_trainer_logp_gap"] == pytest.approx(0.25)
