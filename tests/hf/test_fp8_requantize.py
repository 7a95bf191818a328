"""fp8 of q_b_proj: the model quantizes the query up-projection on the checkpoint's 128×128 grid.

The v3 fixture's decoder linears are stored as DeepSeek block fp8 (block 128, DeepSeek's NumPy
quantizer from test_hf_loading) and loaded with fp32 masters. q_b_proj there is [64, 24]
(N = 4 heads of H + R = 8 + 8 rows): one block, whose scale spans every head's non-RoPE and
RoPE rows, so quantizing w_uq and w_qr apart (two blocks with their own amax) gives the smaller
part another scale and other codes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.hf import load_hf_checkpoint
from deepseek_jax.kernels import fp8
from deepseek_jax.model.layers import einsum
from deepseek_jax.model.mla import MLA, query_up_weight
from deepseek_jax.model.rope import apply_rope, rope_angles
from hf_helpers import fixture, make_folder, tensors
from test_hf_loading import _quantize

NAME = "model.layers.{}.self_attn.q_b_proj.weight"


def _loaded(tmp_path):
    """The fixture in block fp8, its q_b_proj RoPE rows scaled by 0.3 first: in the tiny model
    both parts of q_b_proj otherwise reach the block's top code (448), and a split quantizer
    would then happen to find the same scale for each."""
    originals = tensors(fixture("v3"))
    for layer in (1, 2):
        w = originals[NAME.format(layer)].reshape(4, 16, 24).copy()      # [N, H+R, Q]
        w[:, 8:] *= 0.3
        originals[NAME.format(layer)] = w.reshape(64, 24)
    stored = {}
    for name, w in originals.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight") and w.ndim == 2:
            stored[name], stored[name + "_scale_inv"] = _quantize(w, 128)
        else:
            stored[name] = w
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [128, 128]}
    make_folder(str(tmp_path), "v3", tensors_=stored, config_changes={"quantization_config": qc})
    config, variables = load_hf_checkpoint(str(tmp_path), dtype="float32")
    attn = variables["params"]["moe_layers"]["layers"]["attn"]      # layers 1 and 2, stacked
    return config, stored, attn


def test_requantizing_imported_q_b_proj_gives_the_checkpoints_codes_and_scales(tmp_path):
    config, stored, attn = _loaded(tmp_path)
    for i, layer in enumerate((1, 2)):
        w = query_up_weight(attn["w_uq"][i], attn["w_qr"][i])            # [Q, N, H+R]
        q, s = fp8.quantize_flax_weight(w.reshape(w.shape[0], -1))       # [N(H+R), Q], [1, 1]
        want_q, want_s = stored[NAME.format(layer)], stored[NAME.format(layer) + "_scale_inv"]
        assert s.shape == want_s.shape
        # The block max dequantizes to 448·s; its amax/448 is s up to one fp32 rounding each way.
        np.testing.assert_allclose(np.asarray(s), want_s, rtol=3e-7)
        np.testing.assert_array_equal(np.asarray(q).view(np.uint8), want_q.view(np.uint8))


def test_fp8_queries_use_the_stored_codes(tmp_path):
    """MLA's fp8 query projection of imported weights = the GEMM on the checkpoint's own fp8
    codes and scales (same quantized operands, fp32 accumulation: rounding only)."""
    config, stored, attn = _loaded(tmp_path)
    config = config.replace(fp8=True, fp8_backend="reference", dtype=jnp.float32)
    layer = jax.tree.map(lambda a: a[1], attn)                           # HF layer 2
    B, T, N, H = 2, 5, config.n_heads, config.qk_nope_head_dim
    x = jax.random.normal(jax.random.key(0), (B, T, config.d_model), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_angles(positions, config)
    module = MLA(config)
    q_nope, q_rope = module.apply({"params": layer}, x, cos, sin, method=MLA.queries)
    c_q = module.apply({"params": layer}, x, method=lambda m, x: m.q_norm(einsum(
        "BTD,DQ->BTQ", x, m.w_dq, config.dtype, True, "reference")))   # [B, T, Q], as queries
    # The reference: c_q in 1×128 e4m3 tiles, as the fp8 GEMM quantizes it, times the stored
    # codes with the stored scales.
    c_q = fp8.dequantize_activation(*fp8.quantize_activation(c_q))
    w = fp8.dequantize_weight(jnp.asarray(stored[NAME.format(2)]),
                              jnp.asarray(stored[NAME.format(2) + "_scale_inv"]))  # [N(H+R), Q]
    want = jnp.einsum("BTQ,OQ->BTO", c_q, w).reshape(B, T, N, -1)           # [B, T, N, H+R]
    want_rope = apply_rope(want[..., H:], cos, sin, config.rope_interleaved)
    # Both parts: the block's scale comes from one of them, and splitting the matrix would
    # give the other part its own scale.
    np.testing.assert_allclose(np.asarray(q_nope), np.asarray(want[..., :H]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(q_rope), np.asarray(want_rope), rtol=1e-5, atol=1e-5)
