"""Shared pieces of the checkpoint tests: fixture paths, a cached jitted forward, folder surgery."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.hf.safetensors_io import SafetensorsFolder, save_file
from deepseek_jax.model import Transformer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ("v3", "v2_lite", "moonlight")

# Our float32 forward against transformers' float64 reference (same float32 weights): three or
# four layers of float32 rounding on logits of magnitude ~4; observed ≤ 3e-5.
ATOL = RTOL = 1e-4

FP32 = {"dtype": jnp.float32}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def reference(name: str) -> dict:
    with np.load(os.path.join(fixture(name), "reference.npz")) as z:
        return dict(z)


@functools.lru_cache(maxsize=16)
def forward(config):
    """jit(Transformer(config).apply), compiled once per config across the tests of a worker."""
    return jax.jit(Transformer(config).apply)


def tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, as NumPy arrays."""
    folder = SafetensorsFolder(path)
    return {n: np.array(folder.tensor(n)) for n in folder.names()}


def make_folder(dst: str, src_name: str, tensors_: dict[str, np.ndarray] | None = None,
                config_changes: dict | None = None) -> str:
    """A checkpoint folder at dst: fixture `src_name` with other tensors / config fields."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(fixture(src_name), "config.json")) as f:
        config = json.load(f)
    config.update(config_changes or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    if tensors_ is None:
        shutil.copyfile(os.path.join(fixture(src_name), "model.safetensors"),
                        os.path.join(dst, "model.safetensors"))
    else:
        save_file(tensors_, os.path.join(dst, "model.safetensors"))
    return dst


def flat(variables) -> dict[str, np.ndarray]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(variables)}
