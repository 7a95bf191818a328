"""Where each of our parameters lives in a Hugging Face DeepSeek-V2/V3 checkpoint.

`plan(config)` lists every leaf of `Transformer(config)`'s variables as a `Leaf`: its collection
("params" or "routing"), its path, the HF tensor name(s) it comes from and a `Layout` saying how
our array sits inside that tensor. Nothing is read here; `reader.py` uses the plan to read whole
leaves or any shard of one.

A `Layout` maps each axis of our array onto the row (output) or column (input) axis of the HF
matrix `[out, in]` with a stride, plus a row/column offset. That covers every reshape the import
needs without copying anything first:

  ours                     HF tensor [rows, cols]           row index                col index
  w_dq   [D, Q]            q_a_proj [Q, D]                  q                        d
  w_uq   [Q|D, N, H]       q_b_proj|q_proj [N(H+R), Q|D]    n(H+R) + h               q
  w_qr   [Q|D, N, R]       (same)                           n(H+R) + H + r           q
  w_dkv  [D, C]            kv_a_proj_with_mqa [C+R, D]      c                        d
  w_kr   [D, R]            (same)                           C + r                    d
  w_uk   [C, N, H]         kv_b_proj [N(H+U), C]            n(H+U) + h               c
  w_uv   [C, N, U]         (same)                           n(H+U) + H + u           c
  w_o    [N, U, D]         o_proj [D, NU]                   d                        nU + u
  router [D, E]            mlp.gate.weight [E, D]           e                        d
  w_gate [E, D, F]         mlp.experts.{e}.gate_proj [F, D] f (one tensor per e)     d
  embed  [V, D]            model.embed_tokens [V, D]        v                        d
  lm_head [D, V]           lm_head [V, D]                   v                        d
  eh_proj [2D, D]          eh_proj [D, 2D]                  d                        i

Stacked axes come first and pick the tensor: scanned stacks (`scan_layers=True`) add L
(`.../layers/...`, one tensor per decoder layer), routed experts add E (one tensor per expert).

RoPE columns need no permutation. Our `rope_interleaved=True` rotates the pairs (2i, 2i+1) of
the R RoPE dims with frequency i, as DeepSeek's weights assume; HF DeepseekV3 with
`rope_interleave` rotates the same pairs with the same frequencies but writes the result
de-interleaved ([evens | odds]) — for both q and k, so every score q·k is unchanged. HF
DeepseekV2 rotates the same pairs as complex numbers (interleaved in and out). The parity tests
pin both down. With `rope_interleave=False` both sides rotate the halves (i, i + R/2) (no
fixture covers that setting; no released model uses it).

The MTP module k (k = 1 … K) is `model.layers.{n_layers + k − 1}`: enorm, hnorm, eh_proj,
shared_head.norm and its own decoder layer (self_attn, mlp, both layernorms; its FFN is MoE
whenever the model has routed experts, whatever first_k_dense_replace says).
Its `shared_head.head` and `embed_tokens` copies are not read (our MTP shares the main model's).

`plan` also lists every linear weight as HF stores it ([out, in], K-major) as a `RawLeaf`, with
the path it gets under variables["fp8"] when fp8 weights are kept.

Export (`export.py`) reads the same plan backwards: `hf_index(layout)` gives the HF (row, col)
of every element of one of our arrays, `tensor_groups(leaves)` lists each HF tensor stack with
the leaves that fill it (q_b_proj: w_uq and w_qr; kv_a_proj_with_mqa: w_dkv and w_kr;
kv_b_proj: w_uk and w_uv; every other tensor: one leaf), and `mtp_copies` names the embedding
and output-head copies DeepSeek ships inside each MTP module.

Left out: the fused expert tensors (`mlp.experts.gate_up_proj`) that exist only in transformers'
memory (its save_pretrained writes per-expert tensors, as the hub checkpoints have).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one of our arrays (stacked axes excluded) sits inside one HF tensor.

    Attributes:
      shape: our shape.
      hf_shape: the HF tensor's shape, [out, in] or [n].
      axes: for each of our axes, ("row" or "col", stride).
      row0, col0: offset of element (0, …, 0) in the HF tensor.
    """
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    axes: tuple[tuple[str, int], ...]
    row0: int = 0
    col0: int = 0


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of the variables tree and where it comes from.

    `names` is an object array of HF tensor names whose shape is the stacked axes ((), (L,),
    (E,) or (L, E)); the leaf's shape is names.shape + layout.shape.
    """
    collection: str
    path: tuple[str, ...]
    names: np.ndarray
    layout: Layout

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.names.shape) + tuple(self.layout.shape)

    @property
    def key(self) -> str:
        return "/".join((self.collection, *self.path))


@dataclasses.dataclass(frozen=True)
class RawLeaf:
    """An HF linear weight kept as stored (for keep_fp8): names as in `Leaf`, each [out, in]."""
    path: tuple[str, ...]
    names: np.ndarray
    hf_shape: tuple[int, int]


# --- layouts ------------------------------------------------------------------------------------

def transposed(n_in: int, n_out: int, hf_rows: int | None = None, row0: int = 0) -> Layout:
    """ours [in, out] = HF [out, in]ᵀ (optionally rows row0 … row0+out−1 of a taller tensor)."""
    return Layout((n_in, n_out), (hf_rows or n_out, n_in), (("col", 1), ("row", 1)),
                  row0=row0)


def same(*shape: int) -> Layout:
    """ours = HF, 1-D or 2-D."""
    return Layout(tuple(shape), tuple(shape), tuple(("row", 1) if i == 0 else ("col", 1)
                                                    for i in range(len(shape))))


def per_head(n_in: int, n_heads: int, per: int, width: int, offset: int) -> Layout:
    """ours [in, N, width] = columns offset … offset+width−1 of each head's `per` HF rows."""
    return Layout((n_in, n_heads, width), (n_heads * per, n_in),
                  (("col", 1), ("row", per), ("row", 1)), row0=offset)


def out_proj(n_heads: int, width: int, d: int) -> Layout:
    """ours [N, U, D] = HF o_proj [D, N·U]ᵀ split per head."""
    return Layout((n_heads, width, d), (d, n_heads * width), (("col", width), ("col", 1),
                                                              ("row", 1)))


# --- the plan -----------------------------------------------------------------------------------

def _names(layers: list[int], suffix: str, stacked: bool, n_experts: int = 0) -> np.ndarray:
    """Object array of tensor names: [L][, E] when stacked, [E] or () for one layer."""
    if n_experts:
        grid = [[f"model.layers.{i}.mlp.experts.{e}.{suffix}" for e in range(n_experts)]
                for i in layers]
    else:
        grid = [f"model.layers.{i}.{suffix}" for i in layers]
    arr = np.empty((len(layers), n_experts) if n_experts else (len(layers),), dtype=object)
    arr[...] = grid
    return arr if stacked else arr[0].copy() if n_experts else np.array(grid[0], dtype=object)


def _block(c: ModelConfig, path: tuple[str, ...], layers: list[int], stacked: bool, moe: bool,
           leaves: list, raw: list) -> None:
    """Leaves of one decoder layer (or a scanned stack of them) at `path`."""
    D, N, Q, C = c.d_model, c.n_heads, c.q_lora_rank, c.kv_lora_rank
    H, R, U = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim

    def add(sub: tuple[str, ...], suffix: str, layout: Layout, collection: str = "params",
            experts: int = 0):
        leaves.append(Leaf(collection, path + sub, _names(layers, suffix, stacked, experts),
                           layout))

    def linear(sub: tuple[str, ...], suffix: str, hf_shape: tuple[int, int], experts: int = 0):
        raw.append(RawLeaf(path + sub, _names(layers, suffix, stacked, experts), hf_shape))

    a = ("attn",)
    q_in = Q or D
    if Q:
        add(a + ("w_dq",), "self_attn.q_a_proj.weight", transposed(D, Q))
        add(a + ("q_norm", "scale"), "self_attn.q_a_layernorm.weight", same(Q))
        linear(a + ("q_a_proj",), "self_attn.q_a_proj.weight", (Q, D))
    q_name = "self_attn.q_b_proj.weight" if Q else "self_attn.q_proj.weight"
    add(a + ("w_uq",), q_name, per_head(q_in, N, H + R, H, 0))
    add(a + ("w_qr",), q_name, per_head(q_in, N, H + R, R, H))
    linear(a + (q_name.split(".")[1],), q_name, (N * (H + R), q_in))
    kv_a = "self_attn.kv_a_proj_with_mqa.weight"
    add(a + ("w_dkv",), kv_a, transposed(D, C, hf_rows=C + R))
    add(a + ("w_kr",), kv_a, transposed(D, R, hf_rows=C + R, row0=C))
    linear(a + ("kv_a_proj_with_mqa",), kv_a, (C + R, D))
    add(a + ("kv_norm", "scale"), "self_attn.kv_a_layernorm.weight", same(C))
    kv_b = "self_attn.kv_b_proj.weight"
    add(a + ("w_uk",), kv_b, per_head(C, N, H + U, H, 0))
    add(a + ("w_uv",), kv_b, per_head(C, N, H + U, U, H))
    linear(a + ("kv_b_proj",), kv_b, (N * (H + U), C))
    add(a + ("w_o",), "self_attn.o_proj.weight", out_proj(N, U, D))
    linear(a + ("o_proj",), "self_attn.o_proj.weight", (D, N * U))
    add(("attn_norm", "scale"), "input_layernorm.weight", same(D))
    add(("ffn_norm", "scale"), "post_attention_layernorm.weight", same(D))

    def swiglu(sub: tuple[str, ...], raw_sub: tuple[str, ...], prefix: str, F: int,
               experts: int = 0):
        for ours, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj")):
            add(sub + (ours,), f"{prefix}{hf}.weight", transposed(D, F), experts=experts)
            linear(raw_sub + (hf,), f"{prefix}{hf}.weight", (F, D), experts)
        add(sub + ("w_down",), f"{prefix}down_proj.weight", transposed(F, D), experts=experts)
        linear(raw_sub + ("down_proj",), f"{prefix}down_proj.weight", (D, F), experts)

    if not moe:
        swiglu(("mlp",), ("mlp",), "mlp.", c.d_ff)
        return
    E = c.n_routed_experts
    add(("moe", "router"), "mlp.gate.weight", transposed(D, E))
    if c.routing_bias:
        add(("moe", "bias"), "mlp.gate.e_score_correction_bias", same(E), collection="routing")
    # Expert tensors are named relative to `mlp.experts.{e}.`; `_names` adds that prefix.
    swiglu(("moe",), ("moe", "experts"), "", c.moe_d_ff, experts=E)
    if c.n_shared_experts:
        swiglu(("moe", "shared"), ("moe", "shared"), "mlp.shared_experts.",
               c.n_shared_experts * c.moe_d_ff)


def _stack(c: ModelConfig, name: str, layers: list[int], moe: bool, leaves: list,
           raw: list) -> None:
    if c.scan_layers:
        _block(c, (name, "layers"), layers, True, moe, leaves, raw)
    else:
        for j, i in enumerate(layers):
            _block(c, (name, f"layer_{j}"), [i], False, moe, leaves, raw)


def plan(c: ModelConfig) -> tuple[list[Leaf], list[RawLeaf]]:
    """(every leaf of Transformer(c)'s variables, every HF linear weight) for config `c`."""
    leaves: list[Leaf] = []
    raw: list[RawLeaf] = []
    D, V = c.d_model, c.vocab_size
    one = lambda name: np.array(name, dtype=object)               # noqa: E731
    leaves.append(Leaf("params", ("embed",), one("model.embed_tokens.weight"), same(V, D)))
    n_dense = c.n_layers if not c.n_routed_experts else c.n_dense_layers
    if n_dense:
        _stack(c, "dense_layers", list(range(n_dense)), False, leaves, raw)
    if c.n_moe_layers:
        _stack(c, "moe_layers", list(range(n_dense, c.n_layers)), True, leaves, raw)
    leaves.append(Leaf("params", ("final_norm", "scale"), one("model.norm.weight"), same(D)))
    if not c.tie_embeddings:
        leaves.append(Leaf("params", ("lm_head",), one("lm_head.weight"), transposed(D, V)))
    for k in range(c.mtp_depth):
        i, path = c.n_layers + k, ("mtp", f"layer_{k}")
        pre = f"model.layers.{i}."
        leaves.append(Leaf("params", path + ("enorm", "scale"), one(pre + "enorm.weight"),
                           same(D)))
        leaves.append(Leaf("params", path + ("hnorm", "scale"), one(pre + "hnorm.weight"),
                           same(D)))
        leaves.append(Leaf("params", path + ("eh_proj",), one(pre + "eh_proj.weight"),
                           transposed(2 * D, D)))
        raw.append(RawLeaf(path + ("eh_proj",), one(pre + "eh_proj.weight"), (D, 2 * D)))
        leaves.append(Leaf("params", path + ("norm", "scale"), one(pre + "shared_head.norm.weight"),
                           same(D)))
        _block(c, path + ("block",), [i], False, c.n_routed_experts > 0, leaves, raw)
    return leaves, raw


def mtp_prefix(c: ModelConfig, k: int) -> str:
    """Name prefix of MTP module k (0-based) in an HF checkpoint."""
    return f"model.layers.{c.n_layers + k}."


# Tensors a checkpoint may hold that the import reads nowhere, on purpose.
IGNORED_SUFFIXES = ("shared_head.head.weight", "rotary_emb.inv_freq")


def ignored(name: str, c: ModelConfig) -> bool:
    """Whether an unread tensor is expected (MTP copies of the embedding and head, RoPE caches)."""
    if name.endswith(IGNORED_SUFFIXES):
        return True
    return any(name == mtp_prefix(c, k) + "embed_tokens.weight" for k in range(c.mtp_depth))


def mtp_copies(c: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(HF name, our params path) of the embedding / output head copies in each MTP module.

    DeepSeek-V3 ships `model.layers.{n_layers + k}.embed_tokens` and `.shared_head.head` as
    copies of the main model's (our MTP shares them); the import ignores them (`ignored`).
    """
    head = ("embed",) if c.tie_embeddings else ("lm_head",)
    out = []
    for k in range(c.mtp_depth):
        out.append((mtp_prefix(c, k) + "embed_tokens.weight", ("embed",)))
        out.append((mtp_prefix(c, k) + "shared_head.head.weight", head))
    return out


# --- export: the plan backwards -----------------------------------------------------------------

def hf_index(layout: Layout) -> tuple[np.ndarray, ...]:
    """(rows, cols) — (rows,) for a 1-D tensor — int64 arrays of `layout.shape`: the HF position
    of each element of our array, so that `hf[hf_index(layout)] = ours` writes it back."""
    nd = len(layout.shape)
    rows = np.full([1] * nd, layout.row0, np.int64)
    cols = np.full([1] * nd, layout.col0, np.int64)
    for axis, ((side, stride), n) in enumerate(zip(layout.axes, layout.shape)):
        shape = [1] * nd
        shape[axis] = -1
        offsets = (np.arange(n, dtype=np.int64) * stride).reshape(shape)
        if side == "row":
            rows = rows + offsets
        else:
            cols = cols + offsets
    rows = np.broadcast_to(rows, layout.shape)
    if len(layout.hf_shape) == 1:
        return (rows,)
    return rows, np.broadcast_to(cols, layout.shape)


@dataclasses.dataclass(frozen=True)
class TensorGroup:
    """One HF tensor stack (names: stacked axes as in `Leaf`) and the leaves that fill it."""
    names: np.ndarray
    hf_shape: tuple[int, ...]
    leaves: tuple[Leaf, ...]


def tensor_groups(leaves: list[Leaf]) -> list[TensorGroup]:
    """The leaves grouped by the HF tensors they live in, in plan order."""
    groups: dict[str, list[Leaf]] = {}
    for leaf in leaves:
        groups.setdefault(leaf.names.flat[0], []).append(leaf)
    out = []
    for members in groups.values():
        first = members[0]
        for m in members[1:]:
            if m.names.shape != first.names.shape or m.layout.hf_shape != first.layout.hf_shape:
                raise ValueError(f"{m.key} and {first.key} share {first.names.flat[0]} but not "
                                 "its stacking or shape")
        out.append(TensorGroup(first.names, tuple(first.layout.hf_shape), tuple(members)))
    return out
