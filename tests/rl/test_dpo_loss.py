"""The DPO loss and step (rl/dpo.py) against references written from the formulas: the per-pair
terms in float64 numpy, the pair log-probs from the model's full logits, and the step's gradient
from a loss built on those full logits; empty pairs weigh nothing; a few steps learn a batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.model import Transformer
from deepseek_jax.rl import dpo
from deepseek_jax.train.step import init_train_state
from numerics import assert_leaves_close_in_norm, gradient_rtol, record_gradient

B, T = 4, 16


def _np_terms(logp, ref, n_chosen, s: dpo.DPOSettings) -> dict:
    """The module docstring's formulas in float64."""
    logp, ref = logp.astype(np.float64), ref.astype(np.float64)
    r = logp - ref
    h = r[:, 0] - r[:, 1]
    log_sig = lambda x: -np.logaddexp(0.0, -x)                         # noqa: E731
    loss = {"sigmoid": -(1 - s.label_smoothing) * log_sig(s.beta * h)
                       - s.label_smoothing * log_sig(-s.beta * h),
            "ipo": (h - 1 / (2 * s.beta)) ** 2,
            "hinge": np.maximum(0.0, 1 - s.beta * h)}[s.loss_type]
    nll = -logp[:, 0] / n_chosen
    return {"loss": loss + s.sft_weight * nll, "preference_loss": loss,
            "reward_margin": s.beta * h,
            "reward_chosen": s.beta * r[:, 0], "reward_rejected": s.beta * r[:, 1],
            "reward_accuracy": (h > 0).astype(np.float64), "nll_chosen": nll}


@pytest.mark.parametrize("settings", [
    dpo.DPOSettings(beta=0.1), dpo.DPOSettings(beta=0.5, label_smoothing=0.1, sft_weight=0.3),
    dpo.DPOSettings(beta=0.2, loss_type="ipo"), dpo.DPOSettings(beta=0.3, loss_type="hinge")])
def test_pair_terms_follow_the_formulas(settings):
    rng = np.random.default_rng(0)
    logp = -rng.uniform(5, 60, (64, 2)).astype(np.float32)
    ref = (logp + rng.normal(0, 4, (64, 2))).astype(np.float32)
    mask = np.zeros((64, 2, 8), np.float32)
    mask[:, :, :5] = 1.0
    got = jax.device_get(dpo.pair_terms(logp, ref, mask, settings))
    want = _np_terms(logp, ref, 5.0, settings)
    # Inputs are exact fp32 values; each term is a few fp32 operations on |h| ≲ 30 (the
    # differences of the log-ratios lose nothing beyond one rounding each), so ~4 roundings of
    # values ≲ 1e3 (IPO squares h): 4·u ≈ 2.4e-7 relative, plus the difference's rounding
    # relative to h itself (≲ 60·u absolute on h). rtol 1e-5 / atol 1e-5 bound both.
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_settings_are_checked():
    for bad, match in ((dict(loss_type="kto"), "loss_type"), (dict(beta=0.0), "β must be"),
                       (dict(label_smoothing=0.5), "flip probability"),
                       (dict(loss_type="ipo", label_smoothing=0.1), "'sigmoid' only"),
                       (dict(sft_weight=-1.0), "sft_weight")):
        with pytest.raises(ValueError, match=match):
            dpo.DPOSettings(**bad).check()


@pytest.fixture(scope="module")
def batch(tiny):
    """B pairs: random tokens, each side with a random response span (the prompt before it,
    padding after it), and reference log-probs that put the margins h at O(1)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, tiny.vocab_size, (B, 2, T)).astype(np.int32)
    mask = np.zeros((B, 2, T), np.float32)
    token_mask = np.zeros((B, 2, T), np.float32)
    for b in range(B):
        for s in range(2):
            start, end = rng.integers(2, 7), rng.integers(10, T + 1)
            mask[b, s, start - 1: end - 1] = 1.0           # targets tokens start … end − 1
            token_mask[b, s, :end] = 1.0
            tokens[b, s, end:] = 2
    return {"tokens": tokens, "mask": mask, "token_mask": token_mask}


def _full_logits_logprobs(params, routing, batch, config):
    """[B, 2] from the model's whole [2B, T, V] logits (no chunked head)."""
    tokens = batch["tokens"].reshape(2 * B, T)
    variables = {"params": params, **({"routing": routing} if routing else {})}
    logits, _ = Transformer(config).apply(
        variables, tokens, token_mask=batch["token_mask"].reshape(2 * B, T))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)                 # [2B, T, V]
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], 1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]     # [2B, T]
    return jnp.sum(token_logp * batch["mask"].reshape(2 * B, T), -1).reshape(B, 2)


def test_pair_logprobs_against_the_full_logits(tiny, tiny_variables, batch):
    params, routing = tiny_variables["params"], tiny_variables.get("routing", {})
    got = jax.jit(lambda p, r: dpo.pair_logprobs(p, r, batch, tiny)[0])(params, routing)
    want = jax.jit(lambda p, r: _full_logits_logprobs(p, r, batch, tiny))(params, routing)
    # The same fp32 logits, normalized in chunks or whole: per token a few ulps of |log p| ≈ 6
    # (≲ 1e-6), summed over ≤ 15 targets (≲ 1e-5 of sums ≈ 80); rtol 1e-5 bounds it.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_step_gradient_against_a_full_logits_reference(tiny, batch, microbatches):
    """The gradient the step applies (recorded, not mocked) against jax.grad of the DPO loss
    written out on the full logits, with label smoothing and the NLL term on."""
    settings = dpo.DPOSettings(beta=0.5, label_smoothing=0.1, sft_weight=0.2)
    tx = optax.chain(record_gradient(), optax.sgd(0.1))
    state = init_train_state(jax.random.key(0), tiny, tx, batch=1, length=T)
    logp0 = _full_logits_logprobs(state.params, state.routing, batch, tiny)
    ref = jax.device_get(logp0) + np.array([[0.7, -0.4], [-1.2, 0.3], [0.2, 0.9], [-0.5, -1.0]],
                                           np.float32)                        # h = O(1)
    full = {**batch, "ref_logp": ref}

    def reference_loss(params):
        logp = _full_logits_logprobs(params, state.routing, batch, tiny)
        h = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
        e, b = settings.label_smoothing, settings.beta
        per = -(1 - e) * jax.nn.log_sigmoid(b * h) - e * jax.nn.log_sigmoid(-b * h)
        nll = -logp[:, 0] / batch["mask"][:, 0].sum(-1)
        return jnp.mean(per + settings.sft_weight * nll)

    want = jax.jit(jax.grad(reference_loss))(state.params)
    step = jax.jit(functools.partial(dpo.dpo_step, config=tiny, tx=tx, settings=settings,
                                     microbatches=microbatches))
    new, metrics = step(state, full)
    got = jax.device_get(new.opt_state[0])
    np.testing.assert_allclose(float(metrics["loss"]), float(reference_loss(state.params)),
                               rtol=1e-5)
    # Each gradient entry is a sum over the 2·B·T positions computed in another order (chunked
    # head, micro-batches); κ ≤ 20 as in the other sharded-parity tests (tests/numerics.py).
    assert_leaves_close_in_norm(got, jax.device_get(want), gradient_rtol(2 * B * T, 20.0))


def test_empty_pairs_weigh_nothing(batch):
    rng = np.random.default_rng(2)
    logp, ref = (-rng.uniform(5, 30, (B, 2)).astype(np.float32) for _ in range(2))
    padded = lambda x: np.concatenate([x, np.zeros((2,) + x.shape[1:], x.dtype)])  # noqa: E731
    s = dpo.DPOSettings(sft_weight=0.5)
    a = jax.device_get(dpo.weighted_sums(logp, ref, batch["mask"], s))
    b = jax.device_get(dpo.weighted_sums(padded(logp) - 3.0 * (np.arange(B + 2) >= B)[:, None],
                                         padded(ref), padded(batch["mask"]), s))
    assert float(a["pairs"]) == B and float(b["pairs"]) == B
    terms = jax.device_get(dpo.pair_terms(logp, ref, batch["mask"], s))
    for k in terms:
        # The same B terms plus exact zeros, summed in another order: |a − b| ≤ 2·γ(B + 2)·Σ|t|
        # (tests/numerics.py), a few ulps.
        bound = gradient_rtol(B + 2, 1.0) * float(np.sum(np.abs(terms[k])))
        assert abs(float(a[k]) - float(b[k])) <= bound, k


def test_a_few_steps_learn_to_prefer_the_chosen_side(tiny, batch):
    """Sign check end to end: AdamW on one batch moves the chosen side up against the
    rejected one, so the margins turn positive and the loss falls well below log 2."""
    tx = optax.adam(1e-2)
    state = init_train_state(jax.random.key(0), tiny, tx, batch=1, length=T)
    ref = jax.device_get(_full_logits_logprobs(state.params, state.routing, batch, tiny))
    step = jax.jit(functools.partial(dpo.dpo_step, config=tiny, tx=tx,
                                     settings=dpo.DPOSettings(beta=0.5)))
    full = {**batch, "ref_logp": ref}
    losses = []
    for _ in range(8):
        state, m = step(state, full)
        losses.append(float(m["loss"]))
    # The first step is at the reference: h = 0 up to two programs' rounding, loss log 2.
    assert abs(losses[0] - np.log(2)) < 1e-4
    # 8 Adam steps at lr 1e-2 separate 4 pairs of random tokens easily (observed ≈ 0.02;
    # log 2 ≈ 0.69 at the start): the loss falls below 0.3 and every margin is positive.
    assert losses[-1] < 0.3 and float(m["reward_accuracy"]) == 1.0, losses
