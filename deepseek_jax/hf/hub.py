"""Hugging Face hub ids for `load_hf_checkpoint`: download what the import reads, nothing else.

  folder = checkpoint_folder("deepseek-ai/DeepSeek-V3", revision="main", token=None)

A path that exists is returned as it is. Otherwise a hub id (`org/name`) is fetched with
`huggingface_hub.snapshot_download` into its cache (HF_HOME / HF_HUB_CACHE, or `cache_dir`) in
two steps, so that only the files the import needs come down:

  1. config.json, model.safetensors.index.json and the tokenizer files (TOKENIZER_FILES);
  2. the safetensors files the index names (every `*.safetensors` when there is no index).

The hub's cache makes this resumable: finished files are not fetched again and a download cut
midway restarts from what arrived. `revision` (a branch, tag or commit) and `token` (gated or
private repos; default: the logged-in token) are passed through. With HF_HUB_OFFLINE=1 the
cached snapshot is used without any request.

A hub id that cannot be reached (no network, offline without a cached copy, unknown repo or
revision, no access) raises HFCheckpointError saying why and how to pass a local folder.

Left out: repos whose weights are not safetensors (`pytorch_model.bin`), and the hub's other
repo types (datasets, spaces).
"""

from __future__ import annotations

import json
import os
import re

from deepseek_jax.hf.hf_config import CONFIG_FILE, HFCheckpointError
from deepseek_jax.hf.safetensors_io import INDEX_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(path: str) -> bool:
    """`org/name` that is not an existing path (a local folder always wins)."""
    return (not os.path.exists(path) and _HUB_ID.fullmatch(path) is not None
            and ".." not in path)


def _unreachable(repo_id: str, revision: str | None, error: Exception) -> HFCheckpointError:
    at = f" at revision {revision!r}" if revision else ""
    reason = (str(error).splitlines() or [""])[0].rstrip(". ")
    return HFCheckpointError(
        f"cannot get {repo_id!r}{at} from the Hugging Face hub: {type(error).__name__}: "
        f"{reason} (and no local folder {repo_id!r} exists). Check the id, the revision, the "
        "network and the token (gated repos need `token=` or `hf auth login`); or download the "
        "folder elsewhere (`hf download ORG/NAME --local-dir DIR`) and pass the local folder: "
        "load_hf_checkpoint('DIR')")


def _snapshot(repo_id: str, patterns: list[str], **kw) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise HFCheckpointError(f"{repo_id!r} is a hub id: downloading it needs the "
                                "huggingface_hub package (pip install huggingface_hub), or pass "
                                "a local folder") from None
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, **kw)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise _unreachable(repo_id, kw.get("revision"), e) from e


def download(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
             cache_dir: str | None = None) -> str:
    """The local snapshot folder of `repo_id` holding config, index, shards and tokenizer."""
    kw = dict(revision=revision, token=token, cache_dir=cache_dir)
    folder = _snapshot(repo_id, [CONFIG_FILE, INDEX_FILE, *TOKENIZER_FILES], **kw)
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
    else:
        shards = ["*.safetensors"]
    return _snapshot(repo_id, shards, **kw)


def checkpoint_folder(path: str, *, revision: str | None = None,
                      token: str | bool | None = None, cache_dir: str | None = None) -> str:
    """`path` itself when it exists or is not a hub id; else the downloaded snapshot folder."""
    if is_hub_id(path):
        return download(path, revision=revision, token=token, cache_dir=cache_dir)
    if revision is not None:
        raise HFCheckpointError(f"revision={revision!r} applies to hub ids (org/name); {path!r} "
                                "is a local path")
    return path
