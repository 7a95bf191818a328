"""Cached decoding against the full forward pass: a prefill then one token at a time, rows at
different positions, stale slots overwritten; the latent cache (absorbed MLA) and the expanded
cache agree; MTP drafting over its cache equals the training-time MTP logits.

Tolerance: the cached path computes the same fp32 math with masked slots contributing exact
zeros, but sums in a different order (absorbed vs expanded MLA, a longer S axis); logits of
magnitude ~10 agree to ~1e-5, so we allow rtol 1e-4 with atol 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import Transformer
from deepseek_jax.model.mtp import shift_left
from deepseek_jax.sampling import init_cache

from sampling_helpers import decisive_variables, tiny

B, T, S, PREFILL = 2, 12, 16, 5
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def setup():
    c = tiny()
    v = decisive_variables()
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, c.vocab_size)
    full, mtp = jax.jit(lambda v, t: Transformer(c).apply(v, t))(v, tokens)
    return c, v, tokens, np.asarray(full), np.asarray(mtp)


def _incremental(c, v, tokens, kind):
    """Prefill PREFILL tokens (row 1's last two replaced by junk), then decode row 0 from
    position PREFILL and row 1 from PREFILL − 2, so row 1 overwrites its junk slots.
    Returns [(row, position, logits [V])]."""
    step_config = c.replace(attention_impl="absorbed")
    prefill = jax.jit(lambda v, t, p, cache: Transformer(c).apply(v, t, p, cache, method="decode"))
    step = jax.jit(lambda v, t, p, cache: Transformer(step_config).apply(v, t, p, cache,
                                                                         method="decode"))
    junk = tokens[:, :PREFILL].at[1, PREFILL - 2:].set((tokens[1, PREFILL - 2:PREFILL] + 7) % 64)
    positions = jnp.broadcast_to(jnp.arange(PREFILL), (B, PREFILL))
    cache = init_cache(c, B, S, kind=kind)
    logits, _, cache = prefill(v, junk, positions, cache)
    got = [(0, t, logits[0, t]) for t in range(PREFILL)]
    got += [(1, t, logits[1, t]) for t in range(PREFILL - 2)]
    for j in range(T - PREFILL):
        pos = jnp.array([PREFILL + j, PREFILL - 2 + j])
        tok = tokens[jnp.arange(B), pos]
        logits, _, cache = step(v, tok[:, None], pos[:, None], cache)
        got += [(0, int(pos[0]), logits[0, 0]), (1, int(pos[1]), logits[1, 0])]
    return got


@pytest.fixture(scope="module")
def incremental(setup):
    c, v, tokens, _, _ = setup
    return {kind: _incremental(c, v, tokens, kind) for kind in ("latent", "expanded")}


@pytest.mark.parametrize("kind", ["latent", "expanded"])
def test_incremental_decode_equals_full_forward(setup, incremental, kind):
    _, _, _, full, _ = setup
    got = incremental[kind]
    assert len(got) == 2 * T - 2
    for b, t, logits in got:
        np.testing.assert_allclose(np.asarray(logits), full[b, t], **TOL,
                                   err_msg=f"{kind} cache, row {b}, position {t}")
    assert np.abs(full).max() > 5     # decisive logits: a wrong mask would show


def test_latent_and_expanded_caches_agree(incremental):
    for (b, t, a), (_, _, e) in zip(incremental["latent"], incremental["expanded"]):
        # Absorbed (latent) against expanded attention: fp32 reassociation only.
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_draft_equals_training_mtp_logits(setup):
    """MTP depth 1 over its cache, fed the main hidden states and t_{i+1}, gives the same logits
    as the training forward (which also sees token 0 past the end)."""
    c, v, tokens, full, mtp = setup
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))

    @jax.jit
    def run(v, tokens):
        cache = init_cache(c, B, S, mtp=True)
        logits, hidden, cache = Transformer(c).apply(v, tokens, positions, cache,
                                                     method="decode")
        draft, cache = Transformer(c).apply(v, hidden, shift_left(tokens, 1), positions, cache,
                                            method="draft")
        return logits, draft, cache

    logits, draft, cache = run(v, tokens)
    np.testing.assert_allclose(np.asarray(logits), full, **TOL)
    np.testing.assert_allclose(np.asarray(draft), mtp[0], **TOL)
    assert float(jnp.abs(cache["mtp"]["c_kv"][:, :T]).sum()) > 0
    assert float(jnp.abs(cache["mtp"]["c_kv"][:, T:]).sum()) == 0


def test_unrolled_stack_decodes_like_scanned(setup):
    """scan_layers=False with the same weights laid out per layer gives the same decode."""
    c, v, tokens, full, _ = setup
    cu = c.replace(scan_layers=False)

    def unstack(tree):
        out = {}
        for name, sub in tree.items():
            if isinstance(sub, dict) and "layers" in sub:
                L = jax.tree.leaves(sub["layers"])[0].shape[0]
                out[name] = {f"layer_{i}": jax.tree.map(lambda a: a[i], sub["layers"])
                             for i in range(L)}
            else:
                out[name] = sub
        return out

    vu = {"params": unstack(v["params"]), "routing": unstack(v["routing"])}
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cache = init_cache(cu, B, S)
    logits, _, cache = jax.jit(lambda v, t, p, k: Transformer(cu).apply(v, t, p, k,
                                                                       method="decode"))(
        vu, tokens, positions, cache)
    np.testing.assert_allclose(np.asarray(logits), full, **TOL)
    assert cache["moe_layers"]["c_kv"].shape == (c.n_moe_layers, B, S, c.kv_lora_rank)
