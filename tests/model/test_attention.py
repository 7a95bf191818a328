"""The attention entry point: every backend against the einsum reference (values and gradients,
causal, packed segments, padding), block skipping, bad input, and the model's loss per backend.

Tolerance (used for values and gradients alike). A backend and the reference sum the same fp32
terms in other orders: the row sums of P, the products P·V, and in the backward dP = dO·Vᵀ,
δ = rowsum(dO∘O), dS·K, Pᵀ·dO. Two orders of one n-term sum differ by at most 2·γ(n)·κ
relative (`tests/numerics.py`, Higham §4.2), κ the sum's condition number in norm, which
`_kappa` measures in float64 on the test's own inputs (|P|·|V| against P·V, and so on). The
online softmax adds one rounding of the running sums per key block it crosses (the rescale by
exp(m_old − m_new)), and each exp is within 2 ulp: (2 + n_blocks)·4u more. Gradients chain two
such sums (dS from dP, then dS·K), so their bound doubles. Splash scales q before its dot (one
more rounding of q), well inside the same terms.
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, get_config
from deepseek_jax.kernels import attention as ka
from deepseek_jax.model import Transformer
from deepseek_jax.model.attention import SelfMask, attention, resolve_backend
from deepseek_jax.model.blocks import attention_mask
from deepseek_jax.train.losses import lm_loss
from tests.numerics import U32, assert_leaves_close_in_norm, gradient_rtol

B, T, N, A, U = 2, 128, 2, 40, 16        # A = H + R = 32 + 8; U ≠ A as in MLA
SCALE = A ** -0.5 * 2.0                  # sharper than 1/√A, so softmax is far from uniform
BLOCK = 32                               # blockwise: 4 key blocks over T


def _inputs(seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, A), jnp.float32)
    k = jax.random.normal(kk, (B, T, N, A), jnp.float32)
    v = jax.random.normal(kv, (B, T, N, U), jnp.float32)
    d_out = jax.random.normal(kd, (B, T, N, U), jnp.float32)       # a cotangent to pull back
    return q, k, v, d_out


SEGMENTS = np.array([[1] * 50 + [2] * 60 + [3] * 18, [1] * 128], np.int32)
PADDING = np.ones((B, T), bool)
PADDING[0, 120:] = False                 # right padding
PADDING[1, 40:44] = False                # and a hole: no real query may see those keys
MASKS = {"causal": (None, None), "segments": (SEGMENTS, None), "padding": (None, PADDING),
         "segments+padding": (SEGMENTS, PADDING)}


def _run(backend, seg, pad, q, k, v, d_out, **kw):
    def f(q, k, v):
        if backend == "blockwise_small":            # several key blocks: the online softmax
            s = None if seg is None and pad is None else _fold(seg, pad)
            out = ka.blockwise_attention(q, k, v, scale=SCALE, segment_ids=s, block=BLOCK, **kw)
            return out if pad is None else jnp.where(pad[:, :, None, None], out, 0.0)
        return attention(q, k, v, scale=SCALE, segment_ids=seg, token_mask=pad,
                         backend=backend, **kw)
    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    return out, vjp(d_out)


def _fold(seg, pad):
    seg = np.zeros((B, T), np.int32) if seg is None else seg
    return jnp.asarray(np.where(pad, seg, seg.min() - 1) if pad is not None else seg)


def _kappa(seg, pad, q, k, v, d_out, causal=True):
    """Condition numbers (in norm) of the sums behind out, dq, dk, dv, in float64."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    s = np.einsum("btna,bsna->bnts", q, k) * SCALE
    folded = None if seg is None and pad is None else _fold(seg, pad)
    mask = np.asarray(SelfMask(folded).dense(B, T) if causal
                      else np.ones((B, T, T), bool))[:, None]                  # [B, 1, T, S]
    p = np.where(mask, np.exp(s - np.where(mask, s, -np.inf).max(-1, keepdims=True)), 0)
    p /= p.sum(-1, keepdims=True)
    if pad is not None:                                     # padded queries: output zero
        p = p * pad[:, None, :, None]
    o = np.einsum("bnts,bsnu->btnu", p, v)
    dp = np.einsum("btnu,bsnu->bnts", d_out, v)
    ds = p * (dp - np.einsum("btnu,btnu->bnt", d_out, o)[..., None])
    k_of = lambda a, b, eq: np.linalg.norm(np.einsum(eq, np.abs(a), np.abs(b))) / max(  # noqa
        np.linalg.norm(np.einsum(eq, a, b)), 1e-300)
    return {"out": k_of(p, v, "bnts,bsnu->btnu"), "dq": k_of(ds, k, "bnts,bsna->btna"),
            "dk": k_of(ds, q, "bnts,btna->bsna"), "dv": k_of(p, d_out, "bnts,btnu->bsnu")}


def _tol(kappa, n_blocks, chained=1):
    return chained * (gradient_rtol(T, kappa) + (2 + n_blocks) * 4 * U32)


# blockwise through the entry point (one 256-row block here) with every mask at once; its
# online softmax over several blocks, and splash, with each mask.
CASES = ([("blockwise", "segments+padding")]
         + [(b, m) for b in ("blockwise_small", "splash_interpret") for m in MASKS])


@pytest.mark.parametrize("backend,mask", CASES)
def test_backend_matches_the_einsum_reference(backend, mask):
    seg, pad = MASKS[mask]
    q, k, v, d_out = _inputs()
    want, want_grads = _run("einsum", seg, pad, q, k, v, d_out)
    got, got_grads = _run(backend, seg, pad, q, k, v, d_out)
    n_blocks = T // BLOCK if backend == "blockwise_small" else 1
    kappa = _kappa(seg, pad, q, k, v, d_out)
    assert_leaves_close_in_norm(got, want, _tol(kappa["out"], n_blocks), f"{backend} out")
    for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert_leaves_close_in_norm(g, w, _tol(kappa[name], n_blocks, 2), f"{backend} {name}")
    if pad is not None:                       # padded queries give exactly zero on every backend
        assert not np.asarray(got)[~pad].any()


def test_blockwise_pads_a_length_that_is_not_a_multiple_of_its_block():
    q, k, v, d_out = (x[:, :100] for x in _inputs())
    f = lambda fn, **kw: jax.jit(lambda q, k, v: fn(q, k, v, scale=SCALE, **kw))  # noqa: E731
    want = f(ka.attention_reference)(q, k, v)
    got = f(ka.blockwise_attention, block=BLOCK)(q, k, v)       # 100 = 3 blocks + 4 rows
    np.testing.assert_allclose(got, want, atol=gradient_rtol(100, 4.0) * float(jnp.abs(v).max()))


def test_self_mask_dense_is_the_blocks_attention_mask():
    seg = jnp.asarray(SEGMENTS)
    np.testing.assert_array_equal(SelfMask(seg).dense(B, T), attention_mask(B, T, seg))
    np.testing.assert_array_equal(SelfMask().dense(B, T), attention_mask(B, T))


def _block_visits(fn, *args) -> int:
    """Key-block visits a function's jaxpr makes: the trip counts of its scans (one scan per
    query block, one step per key block), found at any depth."""
    def count(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                total += eqn.params["length"]
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                total += count(getattr(sub, "jaxpr", sub))
        return total
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("n_blocks", [4, 8])
def test_blockwise_skips_the_key_blocks_the_causal_mask_hides(n_blocks):
    q, k, v, _ = _inputs()
    block = T // n_blocks

    def loss(causal):
        return lambda q, k, v: ka.blockwise_attention(q, k, v, scale=SCALE, causal=causal,
                                                      block=block).sum()
    # Forward alone, then forward + backward (the backward revisits the same blocks): n(n+1)/2
    # of the n² block pairs, i.e. (n+1)/2n of the score FLOPs (5/8 at n = 4, 9/16 at n = 8).
    for passes, fn in ((1, loss), (2, lambda c: jax.grad(loss(c), argnums=(0, 1, 2)))):
        causal, full = _block_visits(fn(True), q, k, v), _block_visits(fn(False), q, k, v)
        assert causal == passes * n_blocks * (n_blocks + 1) // 2, causal
        assert full == passes * n_blocks ** 2, full
    assert ka.visited_blocks(n_blocks, True) == list(range(1, n_blocks + 1))


def test_bad_backend_or_length_is_a_clear_error():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=r"runs on tpu, not on cpu.*blockwise"):
        attention(q, k, v, scale=SCALE, backend="splash")
    with pytest.raises(ValueError, match=r"runs on gpu, not on cpu"):
        attention(q, k, v, scale=SCALE, backend="cudnn")
    with pytest.raises(ValueError, match=r"multiple of 128.*Pad.*\(e\.g\. 128\).*blockwise"):
        attention(q[:, :100], k[:, :100], v[:, :100], scale=SCALE, backend="splash_interpret")
    with pytest.raises(ValueError, match=r"bfloat16 or float16.*blockwise"):
        resolve_backend("cudnn", T, jnp.float32, on="gpu")
    with pytest.raises(ConfigError, match="attention_backend"):
        get_config("tiny", attention_backend="flash")


def test_auto_resolves_by_platform():
    assert resolve_backend("auto", 4096, jnp.bfloat16, on="cpu") == "einsum"
    assert resolve_backend("auto", 4096, jnp.bfloat16, on="tpu") == "splash"
    assert resolve_backend("auto", 100, jnp.bfloat16, on="tpu") == "blockwise"
    assert resolve_backend("auto", 4096, jnp.bfloat16, on="gpu") == "cudnn"
    assert resolve_backend("auto", 4096, jnp.float32, on="gpu") == "blockwise"


@pytest.mark.parametrize("backend", ["blockwise", "splash_interpret"])
def test_model_loss_per_backend_equals_einsum(tiny, tiny_variables, backend):
    # Packed rows (three documents in row 0): the segment ids reach every attention layer,
    # MTP's included. T = 128 is splash's smallest block.
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, tiny.vocab_size)
    seg = jnp.asarray(SEGMENTS)
    positions = jnp.asarray([np.concatenate([np.arange(50), np.arange(60), np.arange(18)]),
                             np.arange(T)], jnp.int32)

    def loss(config):
        logits, mtp = Transformer(config).apply(tiny_variables, tokens, positions, seg)
        return lm_loss(logits, tokens, jnp.ones((B, T))), logits, mtp

    want, want_logits, want_mtp = loss(tiny)
    got, got_logits, got_mtp = loss(tiny.replace(attention_backend=backend))
    # Each attention layer (3 blocks + MTP's) differs by at most the bound above (κ ≤ 3, the
    # largest `_kappa` gives on random inputs; this model's attention is smoother). Differences
    # add along the residual stream; at init (std 0.02) the layers do not amplify them.
    rtol = (tiny.n_layers + tiny.mtp_depth) * _tol(3.0, 1)
    assert math.isclose(float(got), float(want), rel_tol=rtol)
    assert_leaves_close_in_norm((got_logits, got_mtp), (want_logits, want_mtp), rtol, backend)
