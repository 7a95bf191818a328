"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1) with an expanded and an absorbed path.

Keys and values are rebuilt from one low-rank latent per token, c_kv = RMSNorm(W_DKV·h) [C], plus
a RoPE key k_r = RoPE(W_KR·h) [R] shared by all heads. Queries optionally go through their own
latent c_q = RMSNorm(W_DQ·h) [Q] (Q = 0: straight from h, as V2-Lite and Moonlight).

  q_nope = W_UQ·c_q [N, H]     q_rope = RoPE(W_QR·c_q) [N, R]
  k_nope = W_UK·c_kv [N, H]    v = W_UV·c_kv [N, U]
  score  = (q_nope·k_nope + q_rope·k_r) · softmax_scale       (fp32 softmax)
  out    = W_O · Σ_s p_s v_s

Two paths over the same parameters (they agree to fp32 rounding, see the tests):

* expanded: materialise k_nope and v for every key (training and prefill);
* absorbed: fold W_UK into the queries (q_lat = q_nope·W_UKᵀ [N, C]) and W_UV into the output,
  so attention runs in latent space and a cache needs only c_kv and k_r per token: C + R values
  (576 for V3) against 2·N·H = 32,768 for an MHA cache of the same model.

The attention cores are pure functions (`expanded_attention`, `absorbed_attention`) over
(queries, latent keys) so that the sampler can call them on a cache.

Parameter names (frozen; HF DeepseekV3 names in brackets):
  w_dq [D, Q] (q_a_proj)   q_norm (q_a_layernorm)   w_uq [Q|D, N, H] and w_qr [Q|D, N, R]
  (q_b_proj, or q_proj when Q = 0, split into its non-RoPE and RoPE columns per head)
  w_dkv [D, C] and w_kr [D, R] (kv_a_proj_with_mqa, split)   kv_norm (kv_a_layernorm)
  w_uk [C, N, H] and w_uv [C, N, U] (kv_b_proj, split)      w_o [N, U, D] (o_proj)

fp8 (`config.fp8`): the projections around the core — w_dq, the query up-projection, w_dkv,
w_kr and w_o — run as DeepSeek fp8 GEMMs (`layers.einsum(..., fp8=True)`: the weight's input
axes are flattened into K and its output axes into N, e.g. w_o [N, U, D] as [N·U, D], and that
matrix is quantized in 128×128 blocks). The query up-projection is one GEMM over w_uq and w_qr
joined per head (`query_up_weight`, [Q, N, H+R] = HF's q_b_proj transposed), so its blocks are
the checkpoint's: a 128-wide block of q_b_proj's rows straddles heads and their non-RoPE/RoPE
parts, and quantizing w_uq and w_qr apart would put block edges elsewhere (other scales, other
codes). w_dkv and w_kr split kv_a_proj_with_mqa at C = 512, a multiple of 128, so their blocks
coincide with the stored ones as they are. The W_UK / W_UV products
stay in `config.dtype` on purpose: they live inside the attention cores, which both paths, the
absorbed one and a latent cache share, and V3 keeps "attention operators" in high precision. (In
DeepSeek's own training code kv_b_proj is an fp8 linear; routing the expanded path's k_nope / v
through fp8 would be a small change in `expanded_attention`.) Scores, softmax, RoPE and the norms
stay in fp32 / `config.dtype` as without fp8. DeepSeek's E5M6 format for the input of w_o is not
used: that input is quantized in e4m3 1×128 tiles like the others.

Masks: `MLA` takes either a dense mask [B, T, S] (a KV cache's, `blocks.cache_mask`: both
paths as described above) or an `attention.SelfMask` (training and prefill without a cache:
segment ids and token mask, causal implied). With a SelfMask the expanded path concatenates
q = [q_nope, q_rope] and k = [k_nope, k_rope per head] into full heads of A = H + R and runs
`attention.attention` with `config.attention_backend` (blockwise, splash on TPU, cuDNN on GPU),
so no [B, N, T, S] score matrix need exist. The einsum backend (the CPU default) and the
absorbed path turn the SelfMask into its dense mask and run the cores above as they are, so
their numbers are those of a dense `blocks.attention_mask`.

Left out: attention dropout (DeepSeek uses none), sliding windows, fused kernels for the
absorbed path and for attention over a cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import adapters, attention, layers
from deepseek_jax.model.layers import RMSNorm, einsum, param
from deepseek_jax.model.rope import apply_rope, rope_angles

_MASKED = -1e30  # added to masked scores; finite so fully masked (padding) rows stay NaN-free


def query_adapters(x: jax.Array, a_uq, a_qr, c: ModelConfig) -> jax.Array:
    """What LoRA adds to the joined query up-projection: [B, T, N, H+R], each half from its
    own pair (`adapters.Pair`), zeros for a half without."""
    B, T, N = x.shape[0], x.shape[1], c.n_heads

    def half(pair, width):
        if pair is None:
            return jnp.zeros((B, T, N, width), c.dtype)
        return adapters.low_rank("BTQ,QNA->BTNA", x, pair, c.dtype)          # [B, T, N, width]

    return jnp.concatenate([half(a_uq, c.qk_nope_head_dim), half(a_qr, c.qk_rope_head_dim)],
                           axis=-1)                                            # [B, T, N, H+R]


def query_up_weight(w_uq: jax.Array, w_qr: jax.Array) -> jax.Array:
    """The query up-projection as DeepSeek stores it (q_b_proj, or q_proj when Q = 0), in our
    [in, out] layout: [Q, N, H+R], each head's H non-RoPE columns then its R RoPE columns, so
    that flattening N·(H+R) gives HF's row order n·(H+R) + (h | H + r)."""
    return jnp.concatenate([w_uq, w_qr.astype(w_uq.dtype)], axis=-1)      # [Q, N, H+R]


def _softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """fp32 softmax over S of scores [B, N, T, S] where mask [B, T, S] is True."""
    scores = jnp.where(mask[:, None, :, :], scores, _MASKED)   # [B, N, T, S]
    return jax.nn.softmax(scores, axis=-1)                      # [B, N, T, S]


def expanded_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale, dtype):
    """Attention with keys and values expanded from the latent.

    q_nope [B, T, N, H], q_rope [B, T, N, R], c_kv [B, S, C], k_rope [B, S, R],
    w_uk [C, N, H], w_uv [C, N, U], mask [B, T, S] (True = attend). Returns [B, T, N, U].
    """
    k_nope = einsum("BSC,CNH->BSNH", c_kv, w_uk, dtype)                     # [B, S, N, H]
    v = einsum("BSC,CNU->BSNU", c_kv, w_uv, dtype)                          # [B, S, N, U]
    k_nope, v = checkpoint_name((k_nope, v), "key_value")
    scores = (jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("BTNR,BSR->BNTS", q_rope, k_rope.astype(dtype),
                           preferred_element_type=jnp.float32)) * scale      # [B, N, T, S]
    probs = _softmax(scores, mask).astype(dtype)                            # [B, N, T, S]
    return jnp.einsum("BNTS,BSNU->BTNU", probs, v)                          # [B, T, N, U]


def absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale, dtype):
    """The same attention computed in latent space; arguments and result as `expanded_attention`."""
    q_lat = einsum("BTNH,CNH->BTNC", q_nope, w_uk, dtype)                   # [B, T, N, C]
    scores = (jnp.einsum("BTNC,BSC->BNTS", q_lat, c_kv.astype(dtype),
                         preferred_element_type=jnp.float32)
              + jnp.einsum("BTNR,BSR->BNTS", q_rope, k_rope.astype(dtype),
                           preferred_element_type=jnp.float32)) * scale      # [B, N, T, S]
    probs = _softmax(scores, mask).astype(dtype)                            # [B, N, T, S]
    o_lat = jnp.einsum("BNTS,BSC->BTNC", probs, c_kv.astype(dtype))         # [B, T, N, C]
    return einsum("BTNC,CNU->BTNU", o_lat, w_uv, dtype)                     # [B, T, N, U]


class MLA(nn.Module):
    """Multi-head Latent Attention over x [B, T, D] at int positions [B, T] with a dense mask
    [B, T, S] or an `attention.SelfMask`."""
    config: ModelConfig

    def setup(self):
        c = self.config
        D, N, Q, C = c.d_model, c.n_heads, c.q_lora_rank, c.kv_lora_rank
        H, R, U = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        q_in, q_axis = (Q, "q_lora") if Q else (D, "embed")

        def weight(name, shape, axes, n_in=1):       # and its LoRA pair, if targeted
            w = param(self, name, shape, axes, c)
            return w, adapters.declare(self, name, shape, axes, c, "attention", n_in)

        if Q:
            self.w_dq, self.a_dq = weight("w_dq", (D, Q), ("embed", "q_lora"))
            self.q_norm = RMSNorm(c, axis_name="q_lora")
        self.w_uq, self.a_uq = weight("w_uq", (q_in, N, H), (q_axis, "heads", "head_dim"))
        self.w_qr, self.a_qr = weight("w_qr", (q_in, N, R), (q_axis, "heads", "head_dim"))
        self.w_dkv, self.a_dkv = weight("w_dkv", (D, C), ("embed", "kv_lora"))
        self.kv_norm = RMSNorm(c, axis_name="kv_lora")
        self.w_kr, self.a_kr = weight("w_kr", (D, R), ("embed", "head_dim"))
        # Read inside the attention cores (expanded, absorbed, cached), not by one projection:
        # adapted as W' = W + s·A·B (`adapters.adapt`). (Declared in this order: each
        # parameter's random init depends on how many were declared before it.)
        for name, shape in (("w_uk", (C, N, H)), ("w_uv", (C, N, U))):
            axes = ("kv_lora", "heads", "head_dim")
            setattr(self, name, adapters.adapt(self, name, param(self, name, shape, axes, c),
                                               axes, c, "attention"))
        self.w_o, self.a_o = weight("w_o", (N, U, D), ("heads", "head_dim", "embed"), n_in=2)

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """(q_nope [B, T, N, H], q_rope [B, T, N, R]) for x [B, T, D]."""
        c = self.config
        if c.q_lora_rank:
            x = einsum("BTD,DQ->BTQ", x, self.w_dq, c.dtype, c.fp8, c.fp8_backend,
                       self.a_dq)                                            # [B, T, Q]
            x = self.q_norm(checkpoint_name(x, "q_latent"))                  # [B, T, Q]
        # With Q = 0 the "Q" axis below is the model width D. One GEMM over q_b_proj as stored
        # (A = H + R, one full query head), so fp8 blocks match the checkpoint's.
        w_q = query_up_weight(self.w_uq, self.w_qr)                          # [Q, N, A]
        q = einsum("BTQ,QNA->BTNA", x, w_q, c.dtype, c.fp8, c.fp8_backend)   # [B, T, N, A]
        if self.a_uq is not None or self.a_qr is not None:   # LoRA: each half's own pair
            q = q + query_adapters(x, self.a_uq, self.a_qr, c)                 # [B, T, N, A]
        q = checkpoint_name(q, "query")                                      # [B, T, N, A]
        H = c.qk_nope_head_dim
        q_nope, q_rope = q[..., :H], q[..., H:]                              # [B, T, N, H|R]
        return q_nope, apply_rope(q_rope, cos, sin, c.rope_interleaved)

    def latents(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """What a cache stores per token: (c_kv [B, T, C] normalized, k_rope [B, T, R] rotated)."""
        c = self.config
        c_kv = einsum("BTD,DC->BTC", x, self.w_dkv, c.dtype, c.fp8, c.fp8_backend,
                      self.a_dkv)                                           # [B, T, C]
        k_rope = einsum("BTD,DR->BTR", x, self.w_kr, c.dtype, c.fp8, c.fp8_backend,
                        self.a_kr)                                          # [B, T, R]
        c_kv, k_rope = checkpoint_name((c_kv, k_rope), "kv_latent")
        c_kv = self.kv_norm(c_kv)                                           # [B, T, C]
        return c_kv, apply_rope(k_rope, cos, sin, c.rope_interleaved)

    def attend(self, q_nope, q_rope, c_kv, k_rope, mask, impl: str | None = None) -> jax.Array:
        """Attention core plus output projection: returns [B, T, D]. `mask` is a dense
        [B, T, S] bool mask or an `attention.SelfMask` (see the module docstring)."""
        c = self.config
        impl = impl or c.attention_impl
        B, T = q_nope.shape[:2]
        # Under context parallelism (T split) the backends take a query offset: always fused.
        if (isinstance(mask, attention.SelfMask) and impl == "expanded"
                and (attention.context_axes(T)
                     or attention.resolve_backend(c.attention_backend, T, c.dtype) != "einsum")):
            o = self.fused_expanded(q_nope, q_rope, c_kv, k_rope, mask)      # [B, T, N, U]
        else:
            real = mask.token_mask if isinstance(mask, attention.SelfMask) else None
            if isinstance(mask, attention.SelfMask):
                mask = mask.dense(B, T)                                      # [B, T, S]
            core = {"expanded": expanded_attention, "absorbed": absorbed_attention}[impl]
            o = core(q_nope, q_rope, c_kv, k_rope, self.w_uk, self.w_uv, mask,
                     c.softmax_scale, c.dtype)                               # [B, T, N, U]
            if real is not None:                 # padding queries: zero, as attention.attention
                o = jnp.where(real[:, :, None, None], o, jnp.zeros((), o.dtype))
        o = layers.constrain(o, (layers.BATCH, layers.LENGTH, layers.HEADS, None))
        o = checkpoint_name(o, "context")                                    # [B, T, N, U]
        out = einsum("BTNU,NUD->BTD", o, self.w_o, c.dtype, c.fp8, c.fp8_backend,
                     self.a_o)                                               # [B, T, D]
        return checkpoint_name(out, "attn_out")

    def fused_expanded(self, q_nope, q_rope, c_kv, k_rope, mask) -> jax.Array:
        """The expanded core through `attention.attention`: [B, T, N, U]. The keys and values
        are expanded from the latents there (`expand`): under context parallelism each device
        gathers the latents (c_kv, k_rope: C + R values a token) and expands them itself,
        rather than gathering the expanded keys and values (N·(A + U) values a token: 71× more
        for V3), and the latents' gradients come back reduce-scattered."""
        c = self.config

        def expand(latents, up):                     # ([B, S, C], [B, S, R]), ([C, N, H], [C, N, U])
            (c_kv, k_rope), (w_uk, w_uv) = latents, up
            k_nope = einsum("BSC,CNH->BSNH", c_kv, w_uk, c.dtype)               # [B, S, N, H]
            v = einsum("BSC,CNU->BSNU", c_kv, w_uv, c.dtype)                    # [B, S, N, U]
            k_rope = jnp.broadcast_to(k_rope[:, :, None, :].astype(c.dtype),
                                      (*k_rope.shape[:2], c.n_heads, k_rope.shape[-1]))
            k = jnp.concatenate([k_nope, k_rope], axis=-1)                      # [B, S, N, A]
            return checkpoint_name((k, v), "key_value")

        q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)      # [B, T, N, A]
        return attention.attention(q.astype(c.dtype), (c_kv, k_rope), (self.w_uk, self.w_uv),
                                   scale=c.softmax_scale, segment_ids=mask.segment_ids,
                                   token_mask=mask.token_mask, backend=c.attention_backend,
                                   expand=expand, order=mask.order)                                # [B, T, N, U]

    def __call__(self, x: jax.Array, positions: jax.Array, mask,
                 impl: str | None = None) -> jax.Array:
        cos, sin = rope_angles(positions, self.config)                       # [B, T, R/2]
        q_nope, q_rope = self.queries(x, cos, sin)
        c_kv, k_rope = self.latents(x, cos, sin)
        return self.attend(q_nope, q_rope, c_kv, k_rope, mask, impl)        # [B, T, D]
