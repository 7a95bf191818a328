"""The output head in chunks of positions (model/head.py) and `Transformer.head_inputs`.

`map_head_chunks` must give what `fn` gives on the whole logits, for every chunk size: dividing
the length, not dividing it (a shorter last chunk), equal to it and larger. Per position the
chunked path runs the same operations on the same numbers; only the head matmul's M dimension
(B·chunk instead of B·T rows) differs, which may change how the backend blocks each D-term dot
product. So outputs agree to the rounding of one D-term fp32 dot: 2·γ(D)·Σ_d|h_d·w_dv|
(tests/numerics.py), passed through `fn` (here Lipschitz-1 in each logit).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ConfigError, get_config
from deepseek_jax.model import Transformer, init_variables
from deepseek_jax.model.head import head_logits, map_head_chunks
from numerics import gradient_rtol

B, T, D, V = 3, 11, 32, 88


def _inputs():
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (B, T, D))
    head = 0.3 * jax.random.normal(k[1], (D, V))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    return hidden, head, targets


def _fn(logits, targets):
    """Two per-position outputs, one of them [B, t, 2], to exercise pytrees and trailing axes."""
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]      # [B, t]
    top2 = jax.lax.top_k(logits, 2)[0]                                        # [B, t, 2]
    return {"picked": picked, "top2": top2}


@pytest.mark.parametrize("chunk", [1, 4, 5, 11, 16])
def test_chunks_give_the_whole_logits_result(chunk):
    hidden, head, targets = _inputs()
    want = _fn(head_logits(hidden, head, jnp.float32), targets)
    got = jax.jit(lambda h, w, t: map_head_chunks(_fn, h, w, t, dtype=jnp.float32,
                                                  chunk=chunk))(hidden, head, targets)
    bound = gradient_rtol(D, 1.0) * float(jnp.max(jnp.abs(hidden) @ jnp.abs(head)))
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=bound, err_msg=name)


def test_chunk_zero_is_the_whole_logits_and_negative_is_refused():
    hidden, head, targets = _inputs()
    want = _fn(head_logits(hidden, head, jnp.float32), targets)
    got = map_head_chunks(_fn, hidden, head, targets, dtype=jnp.float32, chunk=0)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match="chunk=-1 must be >= 0"):
        map_head_chunks(_fn, hidden, head, targets, dtype=jnp.float32, chunk=-1)
    with pytest.raises(ConfigError, match="loss_chunk=-2 must be >= 0"):
        get_config("tiny", loss_chunk=-2)


def test_bf16_compute_matches_head_logits():
    """bf16 compute: each chunk casts the fp32 head to bf16 as `head_logits` does (bf16 products
    are exact in fp32, so only the order of the D-term sums can differ: the same bound)."""
    hidden, head, targets = _inputs()
    hidden = hidden.astype(jnp.bfloat16)
    got = map_head_chunks(_fn, hidden, head, targets, dtype=jnp.bfloat16, chunk=4)
    want = _fn(head_logits(hidden, head, jnp.bfloat16), targets)
    h32, w32 = hidden.astype(jnp.float32), head.astype(jnp.bfloat16).astype(jnp.float32)
    bound = gradient_rtol(D, 1.0) * float(jnp.max(jnp.abs(h32) @ jnp.abs(w32)))
    np.testing.assert_allclose(got["picked"], want["picked"], rtol=0, atol=bound)


def test_head_inputs_are_what_call_turns_into_logits(tiny):
    """`head_inputs` returns the final-normed states and the head `__call__` applies, for the
    main model and each MTP depth, and sows the same MoE statistics."""
    v = init_variables(jax.random.key(0), tiny)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, tiny.vocab_size)
    model = Transformer(tiny)
    (logits, mtp_logits), aux = jax.jit(
        lambda v, t: model.apply(v, t, mutable=["moe_stats"]))(v, tokens)
    (hidden, mtp_hidden, head), aux2 = jax.jit(
        lambda v, t: model.apply(v, t, mutable=["moe_stats"], method="head_inputs"))(v, tokens)
    assert hidden.shape == (2, 8, tiny.d_model)
    assert mtp_hidden.shape == (tiny.mtp_depth, 2, 8, tiny.d_model)
    assert head.shape == (tiny.d_model, tiny.vocab_size) and head.dtype == tiny.param_dtype
    np.testing.assert_array_equal(logits, head_logits(hidden, head, tiny.dtype))
    for k in range(tiny.mtp_depth):
        np.testing.assert_array_equal(mtp_logits[k], head_logits(mtp_hidden[k], head, tiny.dtype))
    jax.tree.map(np.testing.assert_array_equal, aux2["moe_stats"], aux["moe_stats"])
