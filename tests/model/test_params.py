"""Parameter counts from shapes (spec §1.1 [derived] numbers)."""

import flax
import jax
import numpy as np
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.model import count_params
from deepseek_jax.model.transformer import init_variables


@pytest.fixture(scope="module")
def v3_counts():
    return count_params(get_config("v3-671b"))


def test_v3_total(v3_counts):
    assert v3_counts["total"] == pytest.approx(671.03e9, rel=1e-3)


def test_v3_active(v3_counts):
    assert v3_counts["active"] == pytest.approx(37.55e9, rel=5e-3)


def test_v3_mtp(v3_counts):
    assert v3_counts["mtp"] == pytest.approx(11.61e9, rel=5e-3)   # README_WEIGHTS: "11.5B"


def test_v3_layer_shapes():
    """MLA per layer 187.12M, one expert 44.04M (spec §1.1), read off the real parameter tree."""
    shapes = jax.eval_shape(lambda: init_variables(jax.random.key(0), get_config("v3-671b"), 1, 1))
    p = flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes["params"]))
    attn = sum(np.prod(v.shape) for k, v in p.items() if k[:3] == ("moe_layers", "layers", "attn"))
    norms = 2 * 7168 * 58
    assert (attn + norms) / 58 == pytest.approx(187.12e6, rel=1e-4)
    expert = sum(np.prod(p[("moe_layers", "layers", "moe", w)].shape)
                 for w in ("w_gate", "w_up", "w_down")) / (58 * 256)
    assert expert == pytest.approx(44.04e6, rel=1e-4)


def test_v2_lite():
    n = count_params(get_config("v2-lite"))
    assert n["total"] == pytest.approx(15.7e9, rel=2e-3)
    # V2's "2.4B activated" leaves out the input embedding (see params.py); 2.45B here.
    assert n["active"] - n["embedding"] == pytest.approx(2.4e9, rel=2.5e-2)
    assert n["mtp"] == 0
