"""The user's own text: finding the files and reading documents out of them.

`find_files(paths)` takes directories (every non-hidden file below, recursively), glob patterns
(`**` allowed) or file names, one or several, and returns the sorted, de-duplicated file list.
`read_documents(files, text_field)` yields (key, text) pairs:

- `*.jsonl` files: one document per non-blank line, the line a JSON object whose `text_field`
  (default "text") holds a string.
- any other file: the whole file, decoded as UTF-8, is one document.

`fingerprint(files, ...)` names a corpus by its files' paths, sizes and modification times, so
that the TFDS builder stores a changed corpus under a new name instead of reusing stale records.

Left out: compressed inputs, Parquet/CSV, and splitting long plain-text files into several
documents (the packer splits long documents across rows anyway).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Iterator, Sequence


def find_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Sorted absolute paths of the files named by directories, globs or file names.

    Raises:
        ValueError: if a directory or file does not exist, or nothing matches at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no input paths given; pass paths= a directory, glob or file list")
    found: set[str] = set()
    for p in map(os.fspath, paths):
        p = os.path.expanduser(p)
        if glob.has_magic(p):
            matches = [m for m in glob.glob(p, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise ValueError(f"no files match {p!r}; check the pattern")
            found.update(os.path.abspath(m) for m in matches)
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.update(os.path.abspath(os.path.join(root, n))
                             for n in names if not n.startswith("."))
        elif os.path.isfile(p):
            found.add(os.path.abspath(p))
        else:
            raise ValueError(f"{p!r} is not a file, directory or glob that exists")
    if not found:
        raise ValueError(f"no files found under {list(map(os.fspath, paths))}")
    return sorted(found)


def read_documents(files: Sequence[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(key, text) for every document; keys are "path" or "path:line" and unique.

    Raises:
        ValueError: naming the file (and line) of undecodable text, bad JSON or a missing field.
    """
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or text_field not in record:
                        fields = sorted(record) if isinstance(record, dict) else type(record)
                        raise ValueError(f"{path}:{n} has no {text_field!r} field (it has "
                                         f"{fields}); set text_field to the field to train on")
                    if not isinstance(record[text_field], str):
                        raise ValueError(f"{path}:{n} field {text_field!r} is not a string")
                    yield f"{path}:{n}", record[text_field]
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    yield path, f.read()
            except UnicodeDecodeError:
                raise ValueError(f"{path} is not UTF-8 text; remove it from the inputs") from None


def fingerprint(files: Sequence[str], *extra) -> str:
    """12 hex digits from the files' paths, sizes and modification times, plus `extra`."""
    h = hashlib.blake2b(digest_size=6)
    for path in files:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()
