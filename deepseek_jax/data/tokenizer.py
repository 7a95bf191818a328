"""A byte-level character tokenizer for the built-in procedural tasks and the CPU demos.

Ids: 0 <bos>, 1 <eos>, 2 <pad>, then newline and printable ASCII (space … ~): 99 ids in all,
so models built for it use `vocab_size` 128 (padded to a multiple of 64). The bos/eos ids match
DeepSeek-V3's (0 and 1). Characters outside that set are rejected, not silently dropped.

Left out: BPE. Real text uses a real tokenizer (DeepSeek's is a 128K BBPE) through the text
pipeline; this one exists so that the demos and tests need no download.
"""

from __future__ import annotations

import numpy as np

BOS, EOS, PAD = 0, 1, 2
_CHARS = "\n" + "".join(chr(i) for i in range(32, 127))
_TO_ID = {ch: i + 3 for i, ch in enumerate(_CHARS)}
VOCAB_SIZE = 3 + len(_CHARS)  # 99


def encode(text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Characters to ids; raises ValueError naming the first character it cannot encode."""
    try:
        ids = [_TO_ID[ch] for ch in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the character vocabulary "
                         "(newline and printable ASCII only)") from None
    return ([BOS] if bos else []) + ids + ([EOS] if eos else [])


def decode(ids, stop_at_eos: bool = True) -> str:
    """Ids to text; special ids are dropped, and decoding stops at <eos> unless told otherwise."""
    out = []
    for i in np.asarray(ids).tolist():
        if i == EOS and stop_at_eos:
            break
        if i >= 3 and i < VOCAB_SIZE:
            out.append(_CHARS[i - 3])
    return "".join(out)
