"""Built-in procedural text: multi-digit addition and subtraction lines, packed into sequences.

Each line reads like "417+85=502\n". A stream of such lines, tokenized with the byte
tokenizer, is cut into fixed-length windows. Everything is deterministic from a seed, so a run
and its resumption see the same data. The answer digits are the only hard part: a model that
learns the format but not the arithmetic plateaus well above a model that learns both.

Left out: held-out splits and TFDS/Grain storage (the pretraining pipeline builds those).
"""

from __future__ import annotations

import numpy as np

from deepseek_jax.data import tokenizer


def arithmetic_line(rng: np.random.Generator, max_digits: int = 3) -> str:
    a = int(rng.integers(0, 10 ** int(rng.integers(1, max_digits + 1))))
    b = int(rng.integers(0, 10 ** int(rng.integers(1, max_digits + 1))))
    if rng.random() < 0.5:
        return f"{a}+{b}={a + b}\n"
    return f"{a}-{b}={a - b}\n"


def arithmetic_batch(seed: int, batch: int, length: int, max_digits: int = 3) -> np.ndarray:
    """int32 tokens [B, T]: each row a window of a stream of lines that starts with <bos>."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        ids = [tokenizer.BOS]
        while len(ids) < length:
            ids += tokenizer.encode(arithmetic_line(rng, max_digits))
        rows.append(ids[:length])
    return np.asarray(rows, np.int32)
