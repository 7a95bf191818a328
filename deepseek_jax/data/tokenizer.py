"""The default tokenizer: UTF-8 bytes, no files needed.

Ids: 0 <bos>, 1 <eos>, 2 <pad>, then byte b ↦ b + 3: 259 ids in all, so models built for it
use `vocab_size` 320 (padded to a multiple of 64). Any text encodes (non-ASCII characters
become several byte ids); the bos/eos ids match DeepSeek-V3's (0 and 1).

Left out: BPE merges. Real corpora should use a real tokenizer (DeepSeek's is a 128K BBPE) via an
HF `tokenizer.json` (`deepseek_jax.data.encoding.Encoder`); this one exists so that the demos and
tests need no download.
"""

from __future__ import annotations

import numpy as np

BOS, EOS, PAD = 0, 1, 2
_OFFSET = 3
VOCAB_SIZE = _OFFSET + 256  # 259


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Text to ids (UTF-8 bytes shifted past the three special ids)."""
    ids = [b + _OFFSET for b in text.encode("utf-8")]
    return ([BOS] if bos else []) + ids + ([EOS] if eos else [])


def decode(ids, stop_at_eos: bool = True) -> str:
    """Ids to text; special ids are dropped, decoding stops at <eos> unless told otherwise, and
    invalid UTF-8 (e.g. a sequence cut mid-character) decodes with replacement characters."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
        if i == EOS and stop_at_eos:
            break
        if _OFFSET <= i < VOCAB_SIZE:
            out.append(i - _OFFSET)
    return out.decode("utf-8", errors="replace")
