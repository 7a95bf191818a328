"""Generation on the 8 fake CPU devices under a training preset gives the tokens of the
unsharded run. Sharding changes only the order of fp32 reductions, so log-probs agree to
rounding (we allow 1e-5) and greedy tokens exactly (the test model's choices are decisive)."""

import jax
import numpy as np
import pytest

from deepseek_jax import parallel as par
from deepseek_jax.sampling import generate

from sampling_helpers import PROMPTS, decisive_variables, tiny

N = 10


def test_fsdp_generation_equals_unsharded():
    assert len(jax.devices()) == 8
    mesh, rules = par.mesh_and_rules("fsdp")
    v, c = decisive_variables(), tiny()
    prompts = [PROMPTS[b % 3] for b in range(8)]
    got = generate(v, c, prompts, max_new_tokens=N, mesh=mesh, rules=rules)
    # The unsharded reference is the 3-row batch (rows do not depend on the batch around them).
    ref = generate(v, c, PROMPTS, max_new_tokens=N)
    for b in range(8):
        np.testing.assert_array_equal(np.asarray(got.tokens[b]), np.asarray(ref.tokens[b % 3]))
        np.testing.assert_allclose(np.asarray(got.logprobs[b]), np.asarray(ref.logprobs[b % 3]),
                                   atol=1e-5)
    assert len(got.tokens.sharding.device_set) == 8


def test_batch_must_split_over_batch_axes():
    mesh, rules = par.mesh_and_rules("fsdp")
    with pytest.raises(par.MeshError, match="global batch 3 is not divisible"):
        generate(decisive_variables(), tiny(), PROMPTS, max_new_tokens=N, mesh=mesh, rules=rules)
