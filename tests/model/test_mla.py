"""MLA: expanded vs absorbed paths, and the expanded path against a NumPy transcription of the
equations in spec §2.1 (float64, written independently of the einsum code)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.model.blocks import attention_mask
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.rope import inverse_frequencies


def _init(config, B=2, T=9, seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), (B, T, config.d_model), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(B, T)
    params = flax.core.meta.unbox(MLA(config).init(jax.random.key(seed), x, pos, mask))
    # Scale weights up so that attention is far from uniform (a weak test otherwise).
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params)
    return params, x, pos, mask


def _rms(x, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _rope_np(x, pos, config):
    ang = pos[..., None] * inverse_frequencies(config)          # [B, T, R/2]
    if x.ndim == 4:
        ang = ang[:, :, None, :]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def _mla_numpy(p, x, pos, c):
    """Spec §2.1 equation by equation, loops over heads, float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p["params"])
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    cq = _rms(x @ p["w_dq"], c.rms_norm_eps) * p["q_norm"]["scale"]
    ckv = _rms(x @ p["w_dkv"], c.rms_norm_eps) * p["kv_norm"]["scale"]
    kr = _rope_np(x @ p["w_kr"], pos, c)                                    # [B, T, R]
    out = np.zeros((B, T, c.d_model))
    for n in range(c.n_heads):
        qc = cq @ p["w_uq"][:, n]                                          # [B, T, H]
        qr = _rope_np(cq @ p["w_qr"][:, n], pos, c)
        kc = ckv @ p["w_uk"][:, n]
        v = ckv @ p["w_uv"][:, n]
        s = (qc @ kc.transpose(0, 2, 1) + qr @ kr.transpose(0, 2, 1)) * c.softmax_scale
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out += (a @ v) @ p["w_o"][n]
    return out


def test_expanded_matches_numpy_equations(tiny):
    params, x, pos, mask = _init(tiny)
    got = MLA(tiny).apply(params, x, pos, mask, impl="expanded")
    want = _mla_numpy(params, x, np.asarray(pos), tiny)
    # fp32 compute against float64: errors of a few 1e-6 relative to O(1) outputs.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "no_q_lora"])
def test_absorbed_equals_expanded(name):
    c = get_config("tiny") if name == "tiny" else get_config("tiny", q_lora_rank=0)
    params, x, pos, mask = _init(c, seed=3)
    a = MLA(c).apply(params, x, pos, mask, impl="expanded")
    b = MLA(c).apply(params, x, pos, mask, impl="absorbed")
    # Same math, different association order of fp32 products: ~1e-6 relative.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(a))) > 0.1


def test_no_q_lora_has_no_query_latent():
    c = get_config("tiny", q_lora_rank=0)
    params, *_ = _init(c)
    names = set(params["params"])
    assert "w_dq" not in names and "q_norm" not in names
    assert params["params"]["w_uq"].shape == (c.d_model, c.n_heads, c.qk_nope_head_dim)


def test_latent_cache_holds_c_plus_r_values(tiny):
    params, x, pos, _ = _init(tiny)
    from deepseek_jax.model.rope import rope_angles
    cos, sin = rope_angles(pos, tiny)
    c_kv, k_rope = MLA(tiny).apply(params, x, cos, sin, method=MLA.latents)
    assert c_kv.shape[-1] + k_rope.shape[-1] == tiny.kv_cache_values_per_token


def test_causal(tiny):
    params, x, pos, mask = _init(tiny)
    a = MLA(tiny).apply(params, x, pos, mask)
    x2 = x.at[:, 6:].set(jax.random.normal(jax.random.key(9), x[:, 6:].shape))
    b = MLA(tiny).apply(params, x2, pos, mask)
    np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
    assert not np.allclose(np.asarray(a[:, 6:]), np.asarray(b[:, 6:]))
