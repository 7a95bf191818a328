"""Collectives in compiled HLO text: which, how many, how many bytes, how often per step.

  stats = collective_stats(compiled.as_text())
  stats.bytes_by_kind()       # {"all-gather": bytes per device per step, ...}

The text is `jax.stages.Compiled.as_text()`: the per-device program after SPMD partitioning, so
every size here is per device. One instruction line looks like

  %all-gather.3 = bf16[1,256,256]{2,1,0:T(8,128)(2,1)} all-gather(%p), channel_id=7,
      replica_groups=[2,4]<=[8], dimensions={1}, ...

and the parser reads the op, its result shape (a tuple when XLA combined several collectives into
one, e.g. `(f32[4096,1024]{1,0}, f32[1024]{0})`), the replica-group size and the channel id.

Counting rules:

* Kinds: all-gather, reduce-scatter, all-reduce, all-to-all, ragged-all-to-all,
  collective-permute, collective-broadcast. `X-start`/`X-done` pairs (async collectives) are
  counted once, at the `-done` (its result is the collective's output; the start's result
  tuple also holds the inputs). Collectives wrapped in `async-start(..., calls=%c)` are counted
  where they are defined, inside `%c`.
* TPU programs clone one collective into the fusions of its asynchronous start, continuation
  and done (same `channel_id` and shape in each); those count once.
* TPU reduce-scatters are fusions named `all-reduce-scatter.N` around an all-reduce of the whole
  array; they count as reduce-scatters.
* Executions per step: a collective inside a `while` body runs once per iteration. Trip
  counts come from `known_trip_count` in the while's backend config (CPU) or, failing that, the
  integer constant its condition compares against (TPU); multipliers are propagated through
  every calling computation (`body=`, `calls=`, `branch_computations=`, ...). Reductions'
  `to_apply=` bodies hold no collectives and are skipped. A loop whose trip count cannot be read
  (a data-dependent loop) counts once; when its body runs collectives it is listed in
  `unknown_loops`.
* Bytes: `result_bytes` is the output of one execution on one device. `bytes` is the size of the
  whole array the collective moves, the convention of the cost model (`cost_model.py`): the
  gathered output for all-gather, the unreduced input (result × group size) for
  reduce-scatter, the array for all-reduce, all-to-all and permutes.

Left out: send/recv and host transfers (not collectives between devices), and the layout
padding of TPU tiles (sizes are logical element counts × dtype width).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
         "collective-permute", "collective-broadcast")

DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1,
    "token": 0,
}

# One array shape: dtype[dims] with an optional layout {…} (TPU layouts hold (…) but no braces).
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{[^{}]*\})?")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_CALLEES = re.compile(r"\b(body|condition|calls|branch_computations|called_computations)="
                      r"(\{[^}]*\}|%[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,\s]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_SOURCE_TARGET = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_CONSTANT = re.compile(r"=\s*[su](?:32|64)\[\]\S*\s+constant\((\d+)\)")


def shape_bytes(shape: str) -> int:
    """Bytes of every array in a result shape string (a tuple sums its elements)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * DTYPE_BYTES[dtype]
    return total


@dataclasses.dataclass
class Collective:
    """One collective instruction of the per-device program."""
    kind: str            # one of KINDS
    name: str            # instruction name
    computation: str     # the computation it is defined in
    result_bytes: int    # output bytes of one execution on one device (tuples summed)
    group_size: int      # devices taking part together (replica group size; 2 for permutes)
    channel: int | None
    executions: int = 1  # per step, after while-loop trip counts

    @property
    def bytes(self) -> int:
        """Bytes of the whole array moved, per execution (see module docstring)."""
        if self.kind == "reduce-scatter":
            return self.result_bytes * self.group_size
        return self.result_bytes


@dataclasses.dataclass
class CollectiveStats:
    collectives: list[Collective]
    unknown_loops: list[str]

    def by_kind(self) -> dict[str, dict[str, float]]:
        """{kind: {"count": static instructions, "executions": per step, "bytes": per step}}."""
        out: dict[str, dict[str, float]] = {}
        for c in self.collectives:
            row = out.setdefault(c.kind, {"count": 0, "executions": 0, "bytes": 0})
            row["count"] += 1
            row["executions"] += c.executions
            row["bytes"] += c.bytes * c.executions
        return out

    def bytes_by_kind(self) -> dict[str, int]:
        return {k: int(v["bytes"]) for k, v in self.by_kind().items()}

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes * c.executions for c in self.collectives)


def _group_size(attrs: str, kind: str) -> int:
    if kind == "collective-permute":
        return 2
    m = _IOTA_GROUPS.search(attrs)
    if m:
        return int(m.group(2))
    m = _MESH_GROUPS.search(attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1)))
        used = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes[a]) for a in used if a in sizes) if used else 1
    m = _LIST_GROUPS.search(attrs)
    if m:
        return len([d for d in m.group(1).split(",") if d.strip()])
    return 1


def _split_result(rest: str) -> tuple[str, str, str]:
    """'SHAPE opcode(operands), attrs' → (shape, opcode, remainder from the opcode on)."""
    if rest.startswith("("):            # tuple shape: find its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                shape, tail = rest[:i + 1], rest[i + 1:]
                break
        else:
            return rest, "", ""
    else:
        shape, _, tail = rest.partition(" ")
        tail = " " + tail
    m = _OPCODE.match(tail) or _OPCODE.search(tail)
    return shape, (m.group(1) if m else ""), (tail[m.start(1):] if m else "")


def _collective_kind(opcode: str) -> str | None:
    """Kind of an opcode, None if it is not a collective; '-start' ops return None (the '-done'
    carries the count)."""
    if opcode.endswith("-start"):
        return None
    base = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
    return base if base in KINDS else None


def _trip_count(attrs: str, condition: str | None, constants: dict[str, list[int]]) -> int | None:
    m = _TRIP.search(attrs)
    if m:
        return int(m.group(1))
    values = constants.get(condition or "", [])
    return max(values) if values else None


def collective_stats(hlo_text: str) -> CollectiveStats:
    """Parses compiled HLO text; see the module docstring for the counting rules."""
    comps: dict[str, list[tuple[str, str, str, str]]] = collections.OrderedDict()
    entry = None
    current = None
    constants: dict[str, list[int]] = collections.defaultdict(list)
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        shape, opcode, tail = _split_result(rest)
        comps[current].append((name, shape, opcode, tail))
        c = _CONSTANT.search(line)
        if c:
            constants[current].append(int(c.group(1)))

    # Call graph with multipliers: caller → [(callee, factor)].
    edges: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    unknown_loops = []
    for comp, instrs in comps.items():
        for name, _, opcode, tail in instrs:
            callees = {}
            for key, value in _CALLEES.findall(tail):
                for callee in re.findall(r"%([\w.\-]+)", value):
                    callees[callee] = key
            if not callees:
                continue
            factor = 1
            if opcode == "while":
                cond = next((c for c, k in callees.items() if k == "condition"), None)
                trip = _trip_count(tail, cond, constants)
                if trip is None:
                    body = next((c for c, k in callees.items() if k == "body"), None)
                    unknown_loops.append((name, body))
                factor = trip or 1
            for callee, key in callees.items():
                edges[comp].append((callee, factor if key == "body" else 1))

    # Executions per computation: sum over call paths from the entry (HLO call graphs are DAGs).
    order, seen = [], set()

    def visit(c):
        if c in seen:
            return
        seen.add(c)
        for callee, _ in edges.get(c, ()):
            visit(callee)
        order.append(c)

    roots = [entry] if entry else list(comps)
    for r in roots:
        visit(r)
    runs: dict[str, int] = collections.defaultdict(int)
    for r in roots:
        runs[r] = 1
    for c in reversed(order):           # callers before callees
        for callee, factor in edges.get(c, ()):
            runs[callee] += runs[c] * factor

    starts = {name: tail for instrs in comps.values() for name, _, opcode, tail in instrs
              if opcode.endswith("-start")}
    found: dict[tuple, Collective] = {}
    for comp, instrs in comps.items():
        for name, shape, opcode, tail in instrs:
            kind = _collective_kind(opcode)
            if kind is None:
                continue
            if opcode.endswith("-done"):      # group size and channel live on the start
                operand = re.search(r"%([\w.\-]+)", tail)
                tail = starts.get(operand.group(1), tail) if operand else tail
            m = _CHANNEL.search(tail)
            channel = int(m.group(1)) if m else None
            result_bytes = shape_bytes(shape)
            group = _group_size(tail, kind)
            key = (kind, channel, result_bytes) if channel is not None else (kind, comp, name)
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                # TPU writes a reduce-scatter as a fusion `all-reduce-scatter.N` holding an
                # all-reduce of the whole array and a slice; it is called once per use, so it is
                # not one of the async clones either.
                kind, result_bytes = "reduce-scatter", result_bytes // max(group, 1)
                key = (kind, comp, name)
            coll = Collective(kind=kind, name=name, computation=comp, result_bytes=result_bytes,
                              group_size=group, channel=channel,
                              executions=max(runs.get(comp, 0), 1))
            prev = found.get(key)
            if prev is None or coll.executions > prev.executions:
                found[key] = coll
    # Only loops that run collectives matter: those are the ones counted too few times.
    holders = {c.computation for c in found.values()}

    def reaches(comp, stack=()):
        if comp in holders:
            return True
        return any(reaches(c, stack + (comp,)) for c, _ in edges.get(comp, ()) if c not in stack)

    unknown = [name for name, body in unknown_loops if body and reaches(body)]
    return CollectiveStats(collectives=list(found.values()), unknown_loops=unknown)


def format_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
