"""JSON Lines input: `records(path)` yields (where, line number, object) for each non-blank
line, `where` being "PATH:LINE" for the caller's own errors. A line that is not JSON raises
`error` (the caller's error type) naming the file and the line, with `hint` after it.
Conversations, preference pairs and problem files all read through it. Paths go through
`etils.epath`, so a gs:// file reads like a local one.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from etils import epath


def records(path: str, error: type[Exception] = ValueError,
            hint: str = "") -> Iterator[tuple[str, int, Any]]:
    with epath.Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg}){hint}") from None
            yield where, number, record
