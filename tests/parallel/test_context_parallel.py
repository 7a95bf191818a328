"""Context parallelism (preset fsdp_cp): the sequence split over `context` ranks.

The whole train step under fsdp_cp is checked against one device in `test_sharded_parity.py`
(losses, gradients, parameters, layout). Here, the parts that make it work and what it must not
do:
  - attention with the queries split and every key on every device, for each backend that takes
    a query offset, against the unsplit einsum reference (values and gradients). The same
    tolerance as `tests/model/test_attention.py`, for the same reason: each query row's sums are
    the same terms in another order, and dk, dv sum the rows' parts across ranks in another order;
  - the query offset itself, chunk by chunk, without a mesh;
  - the embedding lookup on the table's own slices with the ids split along T (exact: a gather);
  - what the compiled step gathers over the context ranks: the keys' latents, never the
    expanded keys and values nor the layer input;
  - the zigzag order (`model.zigzag`) the train step stores T in: its permutations, the equal
    causal work it gives every rank, attention in that order (every backend) and the model's
    hidden states in that order against the natural-order model on one device;
  - bad input: a length that does not split, cuDNN, and runs that decode.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel as par
from deepseek_jax.config import get_config
from deepseek_jax.kernels import attention as ka
from deepseek_jax.model import attention as attn_mod
from deepseek_jax.model.attention import attention, resolve_backend
from deepseek_jax.model import zigzag
from deepseek_jax.model.layers import lookup
from deepseek_jax.model.transformer import Transformer, init_variables
from deepseek_jax.model.zigzag import Zigzag
from deepseek_jax.train import sharded
from deepseek_jax.train.run import run_mesh
from deepseek_jax.train.step import init_train_state
from tests.model.test_attention import MASKS, SCALE, T, _inputs, _kappa, _run, _tol
from tests.numerics import assert_leaves_close_in_norm, gradient_rtol

CONTEXT = 4


@pytest.fixture(scope="module")
def cp():
    """(mesh, rules): fsdp=2 × context=4 over the 8 devices."""
    mesh = par.make_mesh({"fsdp": 2, "context": CONTEXT})
    return mesh, par.logical_axis_rules("fsdp_cp", mesh)


def test_the_preset_splits_the_sequence_and_holds_weights_over_context():
    assert par.default_mesh_config("fsdp_cp", 8) == {"fsdp": -1, "context": 4}
    mesh = par.make_mesh({"fsdp": 2, "context": 4})
    rules = dict(par.logical_axis_rules("fsdp_cp", mesh))
    assert rules["act_length"] == "context"
    assert rules["act_batch"] == "fsdp"                 # context ranks do not split the batch
    assert rules["embed"] == ("fsdp", "context")        # ZeRO over them
    spec = par.batch_sharding(mesh, par.logical_axis_rules("fsdp_cp", mesh)).spec
    assert spec == P("fsdp", "context")                 # [B, T] batch arrays
    # other presets keep the sequence whole
    dp = par.make_mesh({"data": 8})
    assert dict(par.logical_axis_rules("dp", dp)).get("act_length") is None


@pytest.mark.parametrize("backend,mask", [("einsum", "segments+padding"),
                                          ("blockwise", "segments+padding"),
                                          ("blockwise", "causal")])
def test_attention_with_the_queries_split(cp, backend, mask):
    mesh, rules = cp
    seg, pad = MASKS[mask]
    q, k, v, d_out = _inputs()
    want, want_grads = _run("einsum", seg, pad, q, k, v, d_out)
    with par.sharding_context(mesh, rules):
        assert attn_mod.context_axes(T) == ("context",)
        # blockwise: a rank's 32 rows are one block (min(256, T/4)); the keys are 4 blocks, and
        # rank r visits r + 1 of them
        got, got_grads = _run(backend, seg, pad, q, k, v, d_out)
    n_blocks = T // (T // CONTEXT) if backend == "blockwise" else 1
    kappa = _kappa(seg, pad, q, k, v, d_out)
    assert_leaves_close_in_norm(got, want, _tol(kappa["out"], n_blocks), f"{backend} out")
    for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert_leaves_close_in_norm(g, w, _tol(kappa[name], n_blocks, 2), f"{backend} {name}")
    assert not np.asarray(got)[~pad].any() if pad is not None else True


def test_the_zigzag_order(cp):
    """Rank r's slice of the stored order is natural chunks r and 2n − 1 − r; `natural` undoes
    `stored`; the shift is the natural one; and every rank gets the same causal work (exact
    integer arithmetic)."""
    z, h = Zigzag(CONTEXT), 4                            # 2n = 8 chunks of 4 over T = 32
    x = np.arange(2 * 32 * 3).reshape(2, 32, 3)
    stored = np.asarray(z.stored(jnp.asarray(x)))
    for r in range(CONTEXT):
        chunks = [x[:, i * h:(i + 1) * h] for i in (r, 2 * CONTEXT - 1 - r)]
        np.testing.assert_array_equal(stored[:, 8 * r:8 * (r + 1)], np.concatenate(chunks, 1))
        assert [int(o) for o in z.chunk_offsets(jnp.int32(r), 32)] == [r * h, (7 - r) * h]
    np.testing.assert_array_equal(z.natural(jnp.asarray(stored)), x)
    np.testing.assert_array_equal(z.positions(32), stored[0, :, 0] // 3)
    tokens = x[:, :, 0]
    for k in (1, 5):
        shifted = np.concatenate([tokens[:, k:], np.zeros((2, k), tokens.dtype)], axis=1)
        np.testing.assert_array_equal(z.shift_left(z.stored(jnp.asarray(tokens)), k),
                                      z.stored(jnp.asarray(shifted)))
    # causal work of a rank: Σ over its queries of the keys they see (position + 1)
    work = (z.positions(1024).reshape(CONTEXT, -1) + 1).sum(axis=1)
    contiguous = (np.arange(1024).reshape(CONTEXT, -1) + 1).sum(axis=1)
    assert (work == work[0]).all() and contiguous[-1] / contiguous.mean() > 1.7
    mesh, rules = cp
    with par.sharding_context(mesh, rules):
        assert zigzag.for_length(64) == Zigzag(CONTEXT)
        assert zigzag.for_length(36) is None            # 4 ranks, not 8 chunks: contiguous
    assert zigzag.for_length(64) is None                # no mesh: nothing split


def test_the_dense_mask_in_the_zigzag_order():
    """`SelfMask.dense` with an order (what the einsum paths, e.g. MLA's absorbed attention,
    read) is the natural mask with its rows and columns stored in that order (exact)."""
    z, seg = Zigzag(CONTEXT), jnp.asarray(MASKS["segments"][0])
    want = attn_mod.SelfMask(seg).dense(2, T)                                   # [B, T, S]
    got = attn_mod.SelfMask(z.stored(seg), order=z).dense(2, T)
    np.testing.assert_array_equal(got, z.stored(z.stored(want, axis=1), axis=2))


@pytest.mark.parametrize("backend", ["einsum", "blockwise"])
def test_attention_in_the_zigzag_order(cp, backend):
    """The inputs stored in the zigzag order, attention under fsdp_cp with `order`, and the
    result put back in natural order: the unsplit reference's values and gradients. Same
    tolerance as with contiguous chunks: the same sums in another order."""
    mesh, rules = cp
    seg, pad = MASKS["segments+padding"]
    q, k, v, d_out = _inputs()
    want, want_grads = _run("einsum", seg, pad, q, k, v, d_out)
    z = Zigzag(CONTEXT)
    stored = lambda x: z.stored(jnp.asarray(x))  # noqa: E731
    with par.sharding_context(mesh, rules):
        got, got_grads = _run(backend, stored(seg), stored(pad), *map(stored, (q, k, v, d_out)),
                              order=z)
    got, got_grads = z.natural(got), [z.natural(g) for g in got_grads]
    n_blocks = 2 * CONTEXT if backend == "blockwise" else 1     # blocks of a 16-row chunk
    kappa = _kappa(seg, pad, q, k, v, d_out)
    assert_leaves_close_in_norm(got, want, _tol(kappa["out"], n_blocks), f"{backend} out")
    for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert_leaves_close_in_norm(g, w, _tol(kappa[name], n_blocks, 2), f"{backend} {name}")
    assert not np.asarray(got)[~pad].any()


def test_a_zigzag_order_without_its_context_ranks_is_refused(cp):
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="zigzag order over 4 ranks"):
        attention(q, k, v, scale=SCALE, backend="einsum", order=Zigzag(CONTEXT))


def test_the_model_in_the_zigzag_order(cp):
    """`Transformer.head_inputs` on a batch stored in the zigzag order under fsdp_cp gives the
    one-device, natural-order hidden states and MTP states in stored order, and the same MoE
    statistics: attention, the default positions, MTP's shift and capacity dropping (factor 1,
    so pairs are dropped) all follow natural order. Packed rows with padding.
    Tolerance: fp32 sums in another order, 2·γ(n)·κ per layer with n = T = 64 keys (the longest
    sum), κ ≤ 20 as in test_sharded_parity, over 4 layers (3 + MTP): 4·2·γ(64)·20 ≈ 6e-4.
    Expert choices and drops are discrete; they agree unless rounding flips a near-tie between
    two experts' scores (about 1e-3 a run, as in test_sharded_parity)."""
    mesh, rules = cp
    c = get_config("tiny", moe_capacity_factor=1.0)
    variables = init_variables(jax.random.key(0), c)
    B, Tm = 8, 64
    tokens = jax.random.randint(jax.random.key(1), (B, Tm), 1, c.vocab_size)
    segment_ids = np.repeat(np.arange(1, 5), 16)[None].repeat(B, 0)
    segment_ids[::2] = np.where(np.arange(Tm) < 37, 1, 2)            # a document across ranks
    segment_ids[1, 56:] = 0                                           # padding
    batch = dict(tokens=tokens, segment_ids=jnp.asarray(segment_ids, jnp.int32))
    token_mask = batch["segment_ids"] != 0

    def run(batch, mask, order=None):
        f = lambda v, b, m: Transformer(c).apply(  # noqa: E731
            v, b["tokens"], segment_ids=b["segment_ids"], token_mask=m, order=order,
            mutable=["moe_stats"], method="head_inputs")
        return jax.jit(f)(variables, batch, mask)

    (want_h, want_mtp, _), want_stats = run(batch, token_mask)
    z = Zigzag(CONTEXT)
    with par.sharding_context(mesh, rules):
        (got_h, got_mtp, _), got_stats = run(jax.tree.map(z.stored, batch), z.stored(token_mask),
                                             z)
    rtol = 4 * gradient_rtol(Tm, 20.0)
    assert_leaves_close_in_norm(z.natural(got_h), want_h, rtol, "hidden")
    assert_leaves_close_in_norm(z.natural(got_mtp, axis=2), want_mtp, rtol, "mtp hidden")
    dropped = [x for p, x in jax.tree_util.tree_leaves_with_path(want_stats)
               if "dropped" in jax.tree_util.keystr(p)]
    assert dropped and sum(float(jnp.sum(x)) for x in dropped) > 0     # capacity did drop
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_stats),
                            jax.tree.leaves(got_stats)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_routing_on_each_ranks_own_positions(cp):
    """`routing.local_routing` and `local_load` under fsdp_cp, with each sequence's positions
    split over the 4 context ranks, give the whole-sequence gate, balance loss, its gradient
    with respect to the logits, and expert loads. The gate is per token (exact); the balance
    loss adds each rank's per-sequence sums of positive terms: another order of the same fp32
    sums, 2·γ(T)·κ with κ = 1. Its gradient is the sums' broadcast, the same to that bound."""
    from deepseek_jax.model import routing
    mesh, rules = cp
    c = get_config("tiny")
    B, Tr, E = 8, 64, c.n_routed_experts
    logits = jax.random.normal(jax.random.key(0), (B, Tr, E), jnp.float32)
    bias = jax.random.normal(jax.random.key(1), (E,), jnp.float32) * 0.1
    token_mask = jnp.arange(Tr)[None] < jnp.array([64, 40, 64, 3, 64, 64, 0, 64])[:, None]

    def run(logits):
        layout = routing.layout_from_context(c, batch_size=B)
        if layout is None:                                     # one device: the plain functions
            weights, idx, scores = routing.gate(logits, bias, c)
            balance = routing.sequence_balance_loss(scores, idx, E, token_mask)
            load = routing.expert_load(idx, E, token_mask)
        else:
            assert layout.length_axes == ("context",)
            weights, idx, balance, _ = routing.local_routing(logits, bias, c, layout, token_mask)
            load = routing.local_load(idx, token_mask, E, layout)
        return balance, (weights, idx, load)

    f = jax.jit(jax.value_and_grad(run, has_aux=True))
    (want, (w_want, i_want, l_want)), g_want = f(logits)
    with par.sharding_context(mesh, rules):
        (got, (w_got, i_got, l_got)), g_got = f(logits)
    np.testing.assert_array_equal(i_got, i_want)
    np.testing.assert_array_equal(w_got, w_want)
    np.testing.assert_array_equal(l_got, l_want)                 # integer counts
    rtol = gradient_rtol(Tr, 1.0)
    np.testing.assert_allclose(got, want, rtol=rtol)
    assert_leaves_close_in_norm(g_got, g_want, rtol, "d balance / d logits")
    assert float(jnp.abs(g_want).max()) > 0


@pytest.mark.parametrize("zig", [False, True])
def test_splash_with_the_queries_split(cp, zig):
    """Splash (interpreted) builds one kernel for the whole mask, its tables split with the
    queries: T = 512 gives each rank 128 rows, splash's smallest block. In the zigzag order
    (`zig`) a block holds a rank's two 64-row chunks, and the mask follows each row's natural
    position (splash's q_sequence)."""
    mesh, rules = cp
    z = Zigzag(CONTEXT) if zig else None
    order = (lambda x: z.stored(jnp.asarray(x))) if zig else jnp.asarray  # noqa: E731
    back = z.natural if zig else (lambda x: x)  # noqa: E731
    Tl, N, A, U = 512, 2, 32, 16
    ks = jax.random.split(jax.random.key(3), 4)
    q, k = (jax.random.normal(x, (2, Tl, N, A), jnp.float32) for x in ks[:2])
    v, d_out = (jax.random.normal(x, (2, Tl, N, U), jnp.float32) for x in ks[2:])
    seg = np.repeat(np.array([[0, 1, 2, 3]]), 128, axis=1).repeat(2, axis=0)
    seg[1] = np.arange(Tl) // 200                              # segments across rank borders

    def run(backend, q, k, v, d_out, seg, order=None):
        f = jax.jit(lambda q, k, v: attention(q, k, v, scale=A ** -0.5, segment_ids=seg,
                                              backend=backend, order=order))
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(d_out)

    want, want_grads = run("einsum", q, k, v, d_out, seg)
    with par.sharding_context(mesh, rules):
        got, got_grads = run("splash_interpret", *map(order, (q, k, v, d_out, seg)), z)
    got, got_grads = back(got), [back(g) for g in got_grads]
    # The sums have at most T terms with κ of order 1 for these random inputs; 2·γ(512)·κ with
    # κ ≤ 20, as for the gradients in test_sharded_parity.
    rtol = gradient_rtol(Tl, 20.0)
    assert_leaves_close_in_norm(got, want, rtol, "splash out")
    for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert_leaves_close_in_norm(g, w, 2 * rtol, f"splash {name}")


@pytest.mark.parametrize("causal", [True, False])
def test_query_offset_chunk_by_chunk(causal):
    """Rows [r·t, (r+1)·t) at q_offset = r·t (traced, as under shard_map) against every key are
    those rows of the whole attention; blockwise visits only the key blocks up to its rows."""
    q, k, v, _ = _inputs(1)
    seg = jnp.asarray(MASKS["segments"][0])
    want = ka.attention_reference(q, k, v, scale=SCALE, causal=causal, segment_ids=seg)
    t = T // CONTEXT
    for fn in (ka.attention_reference, functools.partial(ka.blockwise_attention, block=16)):
        f = jax.jit(lambda qr, sr, r, fn=fn: fn(qr, k, v, scale=SCALE, causal=causal,
                                               segment_ids=sr, kv_segment_ids=seg,
                                               q_offset=r * t))
        for r in range(CONTEXT):
            rows = slice(r * t, (r + 1) * t)
            got = f(q[:, rows], seg[:, rows], jnp.int32(r))
            np.testing.assert_allclose(got, want[:, rows], rtol=0,
                                       atol=gradient_rtol(T, 4.0) * float(jnp.abs(v).max()))


def test_offset_without_the_keys_segments_is_an_error():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="kv_segment_ids"):
        ka.attention_reference(q[:, :32], k, v, scale=SCALE, segment_ids=q[:, :32, 0, 0] > 0,
                               q_offset=32)


def test_lookup_with_the_ids_split_along_the_sequence(cp):
    mesh, rules = cp
    table = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    cot = jax.random.normal(jax.random.key(2), (4, 16, 32), jnp.float32)

    def run(fn):
        out, vjp = jax.vjp(jax.jit(lambda t: fn(t, ids)), table)
        return out, vjp(cot)[0]

    want, want_grad = run(lambda t, i: jnp.take(t, i, axis=0))
    with par.sharding_context(mesh, rules):
        got, got_grad = run(lambda t, i: lookup(t, i, jnp.float32))
        text = jax.jit(lambda t: lookup(t, ids, jnp.float32)).lower(table).as_text()
    assert "all_to_all" in text                         # the table's own slices, not a gather
    np.testing.assert_array_equal(got, want)
    # the scatter-add of a row's cotangents may sum its occurrences in another order
    np.testing.assert_allclose(got_grad, want_grad, rtol=gradient_rtol(64, 1.0), atol=1e-6)


@pytest.mark.parametrize("preset,fp8", [("fsdp_cp", False), ("fsdp_cp", True),
                                        ("fsdp_ep_cp", False)])
def test_the_step_gathers_latents_not_keys(preset, fp8):
    """Over the context ranks the compiled step gathers each layer's c_kv [b, T, C] and k_rope;
    never a [b, T, N, ·] key or value, nor a [b, T, D] layer input, nor the router logits
    [b, T, E] (each rank routes its own positions; E = 24 here, a size no other array has); and
    it reduce-scatters the latents' gradients, never all-reducing the keys' nor the logits'.
    With fp8 (bf16, D = 256: whole 128-blocks per shard) the fp8 GEMMs run on each rank's own
    chunk of rows. With expert ranks as well (fsdp_ep_cp: fsdp 2 × expert 2 × context 2) the
    same holds, and each rank's tokens go to their experts by all-to-all."""
    mesh = par.make_mesh(par.default_mesh_config(preset, 8))
    rules = par.logical_axis_rules(preset, mesh)
    c = get_config("tiny", fp8=True, d_model=256, dtype=jnp.bfloat16) if fp8 else \
        get_config("tiny")
    c = c.replace(n_routed_experts=24)
    tx = optax.sgd(0.1)
    step = sharded.make_sharded_train_step(c, tx, mesh, rules)
    state = jax.eval_shape(lambda: init_train_state(jax.random.key(0), c, tx))
    batch = {"tokens": jax.ShapeDtypeStruct((8, 64), jnp.int32)}
    hlo = step.lower(state, batch).compile().as_text()
    # all-gathers whose result has the whole sequence (64) where a rank holds 16
    full = [m.group(1) for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", hlo)
            if "64" in m.group(1).split(",")[1:2]]
    shapes = sorted({tuple(map(int, s.split(","))) for s in full})
    C, N, D, R = c.kv_lora_rank, c.n_heads, c.d_model, c.qk_rope_head_dim
    b = 8 // (mesh.shape["fsdp"] * mesh.shape["expert"])       # this rank's sequences
    t = 64 // mesh.shape["context"]                             # and positions
    assert (b, 64, C) in shapes, shapes                  # the latent
    for shape in shapes:                                 # k_rope's rotation pairs [b, T, R/2, 2]
        assert len(shape) < 4 or shape[2:] == (R // 2, 2) or shape[2] != N, shape  # no key, value
        assert shape[-1] != D, shape                     # no [b, T, D] layer input
        assert shape[-1] != c.n_routed_experts, shape    # no [b, T, E] router logits
    # The latents' gradients leave as reduce-scatters of [b, T/4, C]; the keys' and values'
    # are never all-reduced (the transpose of a whole-k shard_map input would be).
    scattered = {m.group(1) for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? reduce-scatter\(",
                                                 hlo)}
    assert f"{b},{t},{C}" in scattered, scattered
    reduced = [tuple(map(int, m.group(1).split(",")))
               for m in re.finditer(r"= \w+\[([\d,]+)\][^=]*? all-reduce\(", hlo)]
    assert not [r for r in reduced if len(r) == 4 and r[1] == 64 and r[2] == N], reduced
    assert not [r for r in reduced if r[-1:] == (c.n_routed_experts,) and 64 in r], reduced
    # the MoE dispatch: [1, W, D] token rows exchanged with each expert rank, W sized for this
    # rank's own pairs (b·t·X of them, buffer factor 2 over P ranks), not the whole sequence's
    P_ = mesh.shape["expert"]
    W = -(-2 * b * t * c.n_experts_per_token // P_)
    rows = re.findall(rf"= \((?:\w+\[1,(\d+),{D}\]\{{[\d,]+\}},? ?)+\) all-to-all\(", hlo)
    assert set(map(int, rows)) == ({W} if P_ > 1 else set()), (rows, W)


def test_a_length_that_does_not_split_is_refused(cp):
    mesh, rules = cp
    q, k, v, _ = (x[:, :126] for x in _inputs())
    with par.sharding_context(mesh, rules), pytest.raises(ValueError, match="multiple of 4"):
        jax.jit(lambda q, k, v: attention(q, k, v, scale=SCALE, backend="einsum")).lower(q, k, v)


def test_cudnn_under_context_parallelism_is_refused(cp, monkeypatch):
    mesh, rules = cp
    monkeypatch.setattr(attn_mod, "platform", lambda: "gpu")      # traced for a GPU; not run
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _inputs())
    with par.sharding_context(mesh, rules), pytest.raises(ValueError, match="blockwise"):
        jax.eval_shape(lambda q, k, v: attention(q, k, v, scale=SCALE, backend="cudnn"), q, k, v)


def test_runs_that_sample_refuse_a_context_axis(tiny):
    import ml_collections
    m = ml_collections.ConfigDict(dict(preset="fsdp_cp", dcn_data=0, data=0, fsdp=0, context=0,
                                       expert=0, tensor=0, distributed=False))
    with pytest.raises(ValueError, match="mesh.context=1"):
        run_mesh(m, samples=True)
    mesh, _ = run_mesh(m)                                # pretraining and SFT take it
    assert mesh.shape["context"] == 4


def test_context_ranks_on_two_processes_are_refused():
    """Each process reads its own rows, so a sequence's chunks must not span processes. A mesh
    of stand-in devices whose context groups cross a process boundary is refused."""
    from types import SimpleNamespace
    from deepseek_jax.train.run import _check_context_groups
    dev = lambda i, proc: SimpleNamespace(id=i, process_index=proc)  # noqa: E731
    names = ("dcn_data", "data", "fsdp", "context", "expert", "tensor")
    inside = np.array([dev(i, i // 4) for i in range(8)]).reshape(1, 1, 2, 4, 1, 1)
    _check_context_groups(SimpleNamespace(shape={"context": 4}, axis_names=names,
                                          devices=inside))
    across = np.array([dev(i, i // 4) for i in range(8)]).reshape(1, 1, 1, 8, 1, 1)
    with pytest.raises(par.MeshError, match="context × expert × tensor"):
        _check_context_groups(SimpleNamespace(shape={"context": 8}, axis_names=names,
                                              devices=across))


def test_auto_on_gpu_takes_blockwise_under_context_parallelism(cp, monkeypatch):
    """"auto" resolves to cuDNN for bf16 on GPU, which takes no query offset: under context
    parallelism it runs blockwise instead (the platform answered as GPU; the kernels run here)."""
    mesh, rules = cp
    monkeypatch.setattr(attn_mod, "platform", lambda: "gpu")
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _inputs())
    run = lambda backend: jax.jit(lambda q, k, v: attention(  # noqa: E731
        q, k, v, scale=SCALE, backend=backend))(q, k, v)
    with par.sharding_context(mesh, rules):
        assert resolve_backend("auto", T // CONTEXT, jnp.bfloat16) == "cudnn"
        np.testing.assert_array_equal(run("auto"), run("blockwise"))


def test_fp8_projection_on_each_ranks_own_rows(cp):
    """`layers.einsum` with fp8 under fsdp_cp views x [B, T, D] as [n, B, T/n, D] and runs the fp8
    GEMMs per rank on its own rows: the output and dx equal the one-device fp8 projection's. Both
    quantize each token's row in the same 1×128 tiles and sum the same products over K, so only
    the GEMMs' fp32 blocking may differ (1e-5 relative, as in test_fp8_sharded). dw is left out:
    its 1×128 tiles run along the tokens, which a rank groups differently from one device (an
    fp8 rounding apart, tested with the batch split in test_fp8_sharded)."""
    from deepseek_jax.model.layers import einsum
    mesh, rules = cp
    x = jax.random.normal(jax.random.key(0), (4, 64, 256), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (256, 128), jnp.float32) * 0.05
    cot = jax.random.normal(jax.random.key(2), (4, 64, 128), jnp.float32)

    def run():
        f = jax.jit(lambda x: einsum("BTD,DQ->BTQ", x, w, jnp.float32, fp8=True))
        y, vjp = jax.vjp(f, x)
        return y, vjp(cot)[0]

    want_y, want_dx = run()
    with par.sharding_context(mesh, rules):
        got_y, got_dx = run()
    for got, want in ((got_y, want_y), (got_dx, want_dx)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("fp8", [False, True])
def test_one_long_sequence_over_eight_ranks_compiles_for_tpu(fp8):
    """One sequence over context = 8 on a v5p 2x2x2 topology (compile only, through libtpu): the
    Mosaic kernels (splash with its tables split by query chunk, the grouped GEMM, the fp8 GEMMs)
    each run inside a shard_map, since Mosaic cannot be partitioned by the compiler; every
    projection and the MoE work on a rank's own 128 positions, and nothing of a [T, D] layer
    input is gathered. (Before: the MoE left a lone sequence to the compiler, and the compile
    failed.)"""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from deepseek_jax.tools.compile import Strategy, compile_strategy
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    c = get_config("tiny", vocab_size=64, d_model=1024, n_heads=4, q_lora_rank=0,
                   kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
                   moe_d_ff=256, d_ff=512, mtp_depth=0, dtype=jnp.bfloat16, fp8=fp8)
    r = compile_strategy(c, Strategy.make("fsdp_cp", {"fsdp": 1, "context": 8}), devices,
                         1, 1024, keep_hlo=True)
    assert r["fits"], r["error"]
    assert "splash" in r["hlo"] and ("fp8_gemm_nt" in r["hlo"]) == fp8
    gathered = [m.group(1) for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? all-gather", r["hlo"])]
    assert not [s for s in gathered if s.startswith("1,1024,") and s.endswith(",1024")], gathered


def test_the_balance_benchmark_counts_splash_blocks(tmp_path):
    """experiments/benchmarks/context_balance.py end to end at a small size: the splash kernel's
    own tables give every rank the same blocks in the zigzag order and rank r of the contiguous
    layout r + 1 diagonal-block rows (exact counts; the timings are not checked)."""
    import json
    from experiments.benchmarks import context_balance
    out = tmp_path / "balance.json"
    context_balance.main(["--seq", "1024", "--ranks", "4", "--iters", "1", "--json", str(out)])
    blocks = json.loads(out.read_text())["splash"][0]
    # 1024 over 4 ranks: 256-row shards, 128-row blocks (zigzag chunks) and 256-row blocks
    assert blocks["zigzag"] == [blocks["zigzag"][0]] * 4
    assert blocks["contiguous"] == [4.0 * (r + 1) for r in range(4)]
    assert sum(blocks["zigzag"]) < sum(blocks["contiguous"])     # finer blocks on the diagonal
