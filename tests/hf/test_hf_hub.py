"""Hub ids in load_hf_checkpoint, offline against a hub cache laid out as huggingface_hub lays it
out (models--ORG--NAME/refs/REV → commit, snapshots/COMMIT/files)."""

import os
import shutil

from huggingface_hub import constants as hub_constants
import numpy as np
import pytest

from deepseek_jax.hf import HFCheckpointError, load_hf_checkpoint
from deepseek_jax.hf.hub import checkpoint_folder, is_hub_id
from deepseek_jax.hf.safetensors_io import write_sharded
from hf_helpers import fixture, flat, tensors

MAIN = "a" * 40
TAGGED = "b" * 40


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (huggingface_hub reads it once, at import: set its constant too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _snapshot(cache, repo: str, commit: str, refs=("main",)) -> str:
    storage = cache / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True)
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return str(snap)


@pytest.fixture
def hub_cache(tmp_path):
    """deepseek-ai/tiny-v3: main = the v3 fixture in three shards plus a tokenizer file; tag
    v2-lite (another commit) = the v2_lite fixture as one model.safetensors."""
    cache = tmp_path / "hub"
    snap = _snapshot(cache, "deepseek-ai/tiny-v3", MAIN)
    shutil.copy(os.path.join(fixture("v3"), "config.json"), snap)
    write_sharded(tensors(fixture("v3")), snap, 3)
    with open(os.path.join(snap, "tokenizer.json"), "w") as f:
        f.write("{}")
    tagged = _snapshot(cache, "deepseek-ai/tiny-v3", TAGGED, refs=("v2-lite",))
    for fn in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(fixture("v2_lite"), fn), tagged)
    return str(cache)


def assert_same(got, want):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_hub_id_loads_from_the_cache_like_the_folder(offline, hub_cache):
    config, got = load_hf_checkpoint("deepseek-ai/tiny-v3", cache_dir=hub_cache)
    want_config, want = load_hf_checkpoint(fixture("v3"))
    assert config == want_config
    assert_same(got, want)
    folder = checkpoint_folder("deepseek-ai/tiny-v3", cache_dir=hub_cache)
    assert folder.endswith(os.path.join("snapshots", MAIN))
    assert os.path.exists(os.path.join(folder, "tokenizer.json"))
    config, got = load_hf_checkpoint("deepseek-ai/tiny-v3", revision="v2-lite",
                                     cache_dir=hub_cache)
    want_config, want = load_hf_checkpoint(fixture("v2_lite"))
    assert config == want_config and config.score_func == "softmax"
    assert_same(got, want)


def test_an_unreachable_hub_id_says_so_and_how_to_pass_a_folder(offline, hub_cache):
    with pytest.raises(HFCheckpointError, match=r"cannot get 'deepseek-ai/absent'.*local folder"):
        load_hf_checkpoint("deepseek-ai/absent", cache_dir=hub_cache)
    with pytest.raises(HFCheckpointError, match="revision 'v9'.*local folder"):
        load_hf_checkpoint("deepseek-ai/tiny-v3", revision="v9", cache_dir=hub_cache)


def test_local_paths_win_and_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("deepseek-ai/DeepSeek-V3") and not is_hub_id("/abs/path")
    assert not is_hub_id("a/b/c") and not is_hub_id("./x")
    os.makedirs("org/name")
    assert not is_hub_id("org/name")                  # an existing folder is a folder
    with pytest.raises(HFCheckpointError, match="no config.json in org/name"):
        load_hf_checkpoint("org/name")
    with pytest.raises(HFCheckpointError, match="not a directory"):
        load_hf_checkpoint("/no/such/folder")
    with pytest.raises(HFCheckpointError, match="revision='v1' applies to hub ids"):
        load_hf_checkpoint(fixture("v3"), revision="v1")
