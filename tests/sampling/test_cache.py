"""Cache layout and size: the latent cache holds C + R values per token per layer (576 for V3),
the expanded baseline N·(H+R) + N·U. Shapes only (jax.eval_shape): nothing is allocated."""

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.sampling import (cache_bytes, cache_bytes_per_token_per_layer, cache_kind,
                                   cache_logical_axes, init_cache)


def _abstract(config, batch=2, length=16, dtype=None, **kw):
    return jax.eval_shape(lambda: init_cache(config, batch, length, dtype, **kw))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", ["tiny", "v2-lite", "v3-671b"])
def test_bytes_per_token_per_layer_match_formula(name, dtype):
    c = get_config(name)
    size = jnp.dtype(dtype).itemsize
    latent = _abstract(c, dtype=dtype)
    expanded = _abstract(c, dtype=dtype, kind="expanded")
    assert cache_bytes_per_token_per_layer(latent) == (c.kv_lora_rank + c.qk_rope_head_dim) * size
    N = c.n_heads
    assert cache_bytes_per_token_per_layer(expanded) == (
        N * (c.qk_nope_head_dim + c.qk_rope_head_dim) + N * c.v_head_dim) * size
    # Whole cache = per token per layer × tokens × layers.
    assert cache_bytes(latent) == cache_bytes_per_token_per_layer(latent) * 2 * 16 * c.n_layers


def test_v3_latent_cache_is_576_values():
    c = get_config("v3-671b")
    latent = _abstract(c, batch=1, length=4, dtype=jnp.bfloat16, mtp=True)
    assert cache_bytes_per_token_per_layer(latent) == 576 * 2          # 1,152 bytes in bf16
    expanded = _abstract(c, batch=1, length=4, dtype=jnp.bfloat16, kind="expanded")
    assert cache_bytes_per_token_per_layer(expanded) == 128 * (192 + 128) * 2  # 40,960 values
    # Stacks follow the model: 3 dense layers, 58 MoE layers, one MTP module.
    assert latent["dense_layers"]["c_kv"].shape == (3, 1, 4, 512)
    assert latent["moe_layers"]["k_rope"].shape == (58, 1, 4, 64)
    assert latent["mtp"]["c_kv"].shape == (1, 4, 512)
    assert cache_bytes(latent) == 576 * 2 * 4 * 62


def test_kind_and_logical_axes(tiny):
    latent = _abstract(tiny, mtp=True)
    expanded = _abstract(tiny, kind="expanded")
    assert cache_kind(latent) == "latent" and cache_kind(expanded) == "expanded"
    axes = cache_logical_axes(expanded)
    assert axes["moe_layers"]["k"] == ("layers", "act_batch", "act_heads", "act_length", None)
    assert expanded["moe_layers"]["k"].shape == (2, 2, tiny.n_heads, 16, tiny.qk_head_dim)
    assert cache_logical_axes(latent)["mtp"]["c_kv"] == ("act_batch", "act_length", None)
    for tree in (latent, expanded):
        names = cache_logical_axes(tree)
        for name, entries in tree.items():
            for k, a in entries.items():
                assert len(names[name][k]) == a.ndim


def test_init_cache_errors(tiny):
    with pytest.raises(ValueError, match="unknown cache kind"):
        init_cache(tiny, 1, 8, kind="paged")
    with pytest.raises(ValueError, match="mtp_depth=0"):
        init_cache(tiny.replace(mtp_depth=0), 1, 8, mtp=True)
    with pytest.raises(ValueError, match="must be positive"):
        init_cache(tiny, 0, 8)
