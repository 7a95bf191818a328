"""`layers.lookup`: the embedding lookup on the table's own D-slices (8 fake CPU devices) equals
`jnp.take` in values and gradients, and moves no whole table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax import parallel as par
from deepseek_jax.model import layers
from deepseek_jax.tools import hlo

V, D, B, T = 160, 64, 8, 12      # the table (V·D) larger than the batch's rows (B·T·D)


def _inputs():
    rng = np.random.default_rng(0)
    # Small integers: every row and every gradient sum below is exact in fp32, whatever the
    # order of the scatter-add, so the comparisons are exact.
    table = jnp.asarray(rng.integers(-8, 8, (V, D)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    tokens = tokens.at[:, :4].set(tokens[0, :4])          # repeated ids: gradients that sum
    ct = jnp.asarray(rng.integers(-4, 4, (B, T, D)), jnp.float32)
    return table, tokens, ct


def _loss(lookup):
    return lambda table, tokens, ct: jnp.sum(lookup(table, tokens) * ct)


@pytest.mark.parametrize("preset, sizes", [
    ("fsdp", {"fsdp": 8}),
    ("fsdp_ep", {"fsdp": 4, "expert": 2}),
    ("fsdp_ep", {"data": 2, "fsdp": 2, "expert": 2}),
    ("fsdp_tp", {"fsdp": 4, "tensor": 2}),            # vocabulary split: the compiler's take
])
def test_lookup_on_slices_equals_take(preset, sizes):
    table, tokens, ct = _inputs()
    plain = lambda t, ids: jnp.take(t, ids, axis=0)
    want_x = plain(table, tokens)
    want_g = jax.grad(_loss(plain))(table, tokens, ct)
    mesh, rules = par.mesh_and_rules(preset, sizes)
    with par.sharding_context(mesh, rules):
        lookup = lambda t, ids: layers.lookup(t, ids, jnp.float32)
        x = jax.jit(lookup)(table, tokens)
        g = jax.jit(jax.grad(_loss(lookup)))(table, tokens, ct)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(g, want_g)


def test_lookup_moves_no_whole_table_under_fsdp():
    """Under fsdp = 8 the step's collectives are the ids' gather and the rows' all-to-alls; the
    compiler's own lookup gathers the [V, D] table, and reduces its gradient, whole."""
    table, tokens, ct = _inputs()
    mesh, rules = par.mesh_and_rules("fsdp", {"fsdp": 8})
    args = (jax.device_put(table, NamedSharding(mesh, P(None, "fsdp"))),
            jax.device_put(tokens, NamedSharding(mesh, P("fsdp"))),
            jax.device_put(ct, NamedSharding(mesh, P("fsdp"))))
    whole = V * D * 4
    biggest = {}
    for name, lookup in (("take", lambda t, ids: jnp.take(t, ids, axis=0)),
                         ("lookup", lambda t, ids: layers.lookup(t, ids, jnp.float32))):
        with par.sharding_context(mesh, rules):
            text = jax.jit(jax.grad(_loss(lookup))).lower(*args).compile().as_text()
        biggest[name] = max(c.bytes for c in hlo.collective_stats(text).collectives)
    assert biggest["take"] >= whole                 # the test sees what it is meant to catch
    assert biggest["lookup"] <= B * T * D * 4       # the rows' all-to-all, at most
