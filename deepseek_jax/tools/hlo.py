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
  where they are defined, inside `%c`, once per run of the start.
* TPU programs clone one collective into the fusions of its asynchronous start, continuation
  and done (same `channel_id` and shape in each); those count once. Instructions of one
  computation are never clones: explicit collectives lowered from a `shard_map` body share
  `channel_id=1` and each counts.
* TPU reduce-scatters are fusions named `all-reduce-scatter.N` around an all-reduce of the whole
  array; they count as reduce-scatters.
* Executions per step: a collective inside a `while` body runs once per iteration, and nested
  loops multiply. Trip counts come from `known_trip_count` in the while's backend config (XLA:CPU)
  or, failing that (TPU), from the loop itself: the condition's ROOT `compare` of a counter
  (a tuple element) with a constant, the counter's start in the while's init tuple (a constant,
  through copies; 0 otherwise) and its step in the body (`add(counter, constant)`; 1 otherwise),
  so a loop the compiler unrolled into steps of 2 counts half as many iterations. Multipliers
  are propagated through every calling computation (`body=`, `calls=`, `branch_computations=`,
  ...; an async `-done` repeats its start's `calls=` and is not followed), including a `call`'s
  or `call-start`'s `to_apply=` (TPU7x offloads collectives to its SparseCores as
  `call-start(..., async_execution_thread="sparsecore", to_apply=%c)`, the collective inside
  `%c`; a reduction's `to_apply=` holds no collective and is not followed). A loop whose trip
  count cannot be read (a data-dependent loop) counts once; when its body runs collectives it is
  listed in `unknown_loops`.
* Roles: on TPU the SPMD partitioner writes a large all-gather or reduce-scatter feeding a
  matmul as a windowed einsum, a loop (`windowed_dot_general_body_ag` / `_rs`) of
  collective-permutes that move one shard per step around a ring, with the first (or last)
  permute peeled off before (after) the loop. Those permutes keep their kind but take the
  `role` of the collective they stand for; a bidirectional windowed gather over n devices moves
  about n + 1 shards, the gathered array plus one shard. An all-reduce whose users only keep
  one shard of it (a dynamic-slice, or a fusion that only dynamic-slices one shard out of it)
  has the role reduce-scatter. Over a group spanning a 3-D torus (e.g. all 64 chips of a v5p
  4x4x4) libtpu writes an all-gather as an all-reduce of a zero buffer holding each device's
  shard (a broadcast updated by a dynamic-update-slice): that all-reduce has the role
  all-gather (its bytes, the whole array, are the gather's convention too). Each element of a
  combined (tuple) all-reduce is judged alone, and one that mixes roles is listed once per role
  (same name, that role's bytes): TPU7x combines weight gathers and gradient reductions into one
  all-reduce offloaded to its SparseCores, whose operands and users are in the caller (the
  `call-update(start, args...)` binding the called computation's parameters, and the
  `call-done`). `bytes_by_role()` sums by role; the planner's AG/RS/AR/A2A columns are roles.
* Group size: the replica-group size; for a permute, the devices of the ring (or chain) its
  source-target pairs form.
* Bytes: `result_bytes` is the output of one execution on one device. `bytes` is the size of the
  whole array the collective moves, the convention of the cost model (`cost_model.py`): the
  gathered output for all-gather, the unreduced input (result × group size) for
  reduce-scatter, the array for all-reduce, all-to-all and permutes (one shard for each step of
  a windowed einsum).

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


def shape_elements(shape: str) -> int:
    """Values in every array of a result shape string (a tuple sums its elements)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) if dims else 1
               for _, dims in _ARRAY.findall(shape))


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
    # What the collective does for the program: its kind, except for the collective-permutes
    # of a TPU windowed einsum loop, which gather ("all-gather") or scatter ("reduce-scatter")
    # an operand of a matmul one shard at a time.
    role: str = ""
    # Inside a loop whose trip count cannot be read (data-dependent, e.g. the expert-parallel
    # overflow rounds), where `executions` assumes one run.
    in_unknown_loop: bool = False

    def __post_init__(self):
        self.role = self.role or self.kind

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

    def bytes_by_role(self, skip_unknown_loops: bool = False) -> dict[str, int]:
        """Bytes per step by what the collectives do: windowed-einsum permutes count with the
        all-gathers or reduce-scatters they stand for (see `Collective.role`).
        skip_unknown_loops: leave out the collectives of loops of unknown trip count (a step
        in which they do not run: a balanced expert-parallel step has no overflow round)."""
        out: dict[str, int] = {}
        for c in self.collectives:
            if not (skip_unknown_loops and c.in_unknown_loop):
                out[c.role] = out.get(c.role, 0) + c.bytes * c.executions
        return out

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes * c.executions for c in self.collectives)


def _permute_group(attrs: str) -> int:
    """Devices in the ring or chain of the first source-target pair (a ring over n devices: n)."""
    pairs = [tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", attrs)]
    if not pairs:
        return 2
    linked = collections.defaultdict(set)
    for a, b in pairs:
        linked[a].add(b)
        linked[b].add(a)
    seen, todo = set(), [pairs[0][0]]
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo.extend(linked[d] - seen)
    return max(len(seen), 2)


def _group_size(attrs: str, kind: str) -> int:
    if kind == "collective-permute":
        m = _SOURCE_TARGET.search(attrs)
        return _permute_group(m.group(1)) if m else 2
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


# --- the program: computations and their instructions -----------------------------------------

@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    tail: str            # from the opcode on: operands and attributes
    root: bool = False

    @property
    def operands(self) -> list[str]:
        """Names of the operands, in order (the first parenthesised group after the opcode)."""
        depth, end = 0, len(self.tail)
        for i, ch in enumerate(self.tail):
            depth += ch == "("
            depth -= ch == ")"
            if ch == ")" and depth == 0:
                end = i
                break
        return re.findall(r"%([\w.\-]+)", self.tail[:end])


def _parse(hlo_text: str) -> tuple[dict[str, dict[str, _Instr]], str | None]:
    """({computation: {instruction name: _Instr}} in text order, entry computation name)."""
    comps: dict[str, dict[str, _Instr]] = {}
    entry = current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = {}
            entry = current if m.group(1) else entry
            continue
        m = _INSTRUCTION.match(line) if current is not None else None
        if m:
            shape, opcode, tail = _split_result(m.group(2))
            comps[current][m.group(1)] = _Instr(m.group(1), shape, opcode, tail,
                                                line.lstrip().startswith("ROOT"))
    return comps, entry


def _callees(instr: _Instr) -> dict[str, str]:
    """{called computation: how it is called (body, condition, calls, ...)}."""
    out = {}
    for key, value in _CALLEES.findall(instr.tail):
        for callee in re.findall(r"%([\w.\-]+)", value):
            out[callee] = key
    if instr.opcode in ("call", "call-start"):
        out.update((c, "to_apply") for c in re.findall(r"\bto_apply=%([\w.\-]+)", instr.tail))
    return out


# --- loop trip counts -------------------------------------------------------------------------

def _constant(comp: dict[str, _Instr], name: str) -> int | None:
    """The integer value of `name` in `comp`, through copies, converts and bitcasts."""
    for _ in range(8):
        instr = comp.get(name)
        if instr is None:
            return None
        if instr.opcode == "constant":
            m = re.match(r"constant\((-?\d+)\)", instr.tail)
            return int(m.group(1)) if m else None
        if instr.opcode not in ("copy", "convert", "bitcast") or not instr.operands:
            return None
        name = instr.operands[0]
    return None


def _tuple_index(comp: dict[str, _Instr], name: str) -> int | None:
    instr = comp.get(name)
    if instr is None or instr.opcode != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", instr.tail)
    return int(m.group(1)) if m else None


def _loop_bound(cond: dict[str, _Instr]) -> tuple[int, int, str] | None:
    """(tuple index of the counter, bound, direction) from the condition's ROOT compare."""
    root = next((i for i in cond.values() if i.root), None)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = (re.search(r"direction=(\w+)", root.tail) or [None, "LT"])[1]
    a, b = root.operands
    flip = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE"}
    for counter, bound, d in ((a, b, direction), (b, a, flip.get(direction, direction))):
        index, value = _tuple_index(cond, counter), _constant(cond, bound)
        if index is not None and value is not None:
            return index, value, d
    return None


def _loop_start_and_step(index: int, init: int | None, body: dict[str, _Instr]) -> tuple[int, int]:
    """(start, step) of the counter at tuple `index`: start from the while's init (0 if not a
    constant), step from the body's `add(counter, constant)` (1 if not found)."""
    root = next((i for i in body.values() if i.root), None)
    step = 1
    if root is not None and root.opcode == "tuple" and index < len(root.operands):
        update = body.get(root.operands[index])
        if update is not None and update.opcode in ("add", "subtract"):
            for x, y in (update.operands, update.operands[::-1]):
                if _tuple_index(body, x) == index and _constant(body, y) is not None:
                    step = _constant(body, y) * (1 if update.opcode == "add" else -1)
                    break
    return (init or 0), step


def _trip_count(loop: _Instr, caller: dict[str, _Instr],
                comps: dict[str, dict[str, _Instr]]) -> int | None:
    """Iterations of a `while`: `known_trip_count` from its backend config (XLA:CPU), else
    counted from the condition's compare, the counter's start in the init tuple and its step in
    the body (TPU, whose loops may be unrolled into steps of 2 or more). None if unreadable."""
    m = _TRIP.search(loop.tail)
    if m:
        return int(m.group(1))
    called = {k: c for c, k in _callees(loop).items()}
    bound = _loop_bound(comps.get(called.get("condition"), {}))
    if bound is None:
        return None
    index, limit, direction = bound
    init_tuple = caller.get(loop.operands[0]) if loop.operands else None
    init = None
    if init_tuple is not None and init_tuple.opcode == "tuple" and index < len(init_tuple.operands):
        init = _constant(caller, init_tuple.operands[index])
    start, step = _loop_start_and_step(index, init, comps.get(called.get("body"), {}))
    span = {"LT": limit - start, "LE": limit - start + 1, "NE": limit - start,
            "GT": start - limit, "GE": start - limit + 1}.get(direction)
    stride = step if direction in ("LT", "LE", "NE") else -step
    if span is None or stride <= 0:
        return None
    return max(0, -(-span // stride))


# --- executions per step ------------------------------------------------------------------------

def _call_graph(comps: dict[str, dict[str, _Instr]]) -> tuple[dict, list[tuple[str, str]]]:
    """(caller → [(callee, runs per caller run)], [(loop, body)] of unreadable trip counts).
    Async `-done`/`-update` ops repeat their start's `calls=`; only the start counts."""
    edges: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    unknown = []
    for comp, instrs in comps.items():
        for instr in instrs.values():
            callees = _callees(instr)
            if not callees or instr.opcode.endswith(("-done", "-update")):
                continue
            factor = 1
            if instr.opcode == "while":
                trip = _trip_count(instr, instrs, comps)
                if trip is None:
                    unknown.append((instr.name, next((c for c, k in callees.items()
                                                      if k == "body"), None)))
                factor = 1 if trip is None else trip
            for callee, key in callees.items():
                edges[comp].append((callee, factor if key == "body" else 1))
    return edges, unknown


def _executions(comps, edges, entry: str | None) -> dict[str, int]:
    """Runs per step of every computation: the sum over call paths from the entry (HLO call
    graphs are DAGs); without an entry, every computation is a root."""
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
    return runs


def _windowed_roles(comps, edges) -> dict[str, str]:
    """{computation: "all-gather" | "reduce-scatter"} for the bodies of TPU windowed einsum
    loops (`windowed_dot_general_body_ag` / `_rs`) and everything they call."""
    roles = {}
    for comp in comps:
        m = re.search(r"windowed_dot_general_body_(ag|rs)", comp)
        if not m:
            continue
        role, todo = ("all-gather" if m.group(1) == "ag" else "reduce-scatter"), [comp]
        while todo:
            c = todo.pop()
            if c not in roles:
                roles[c] = role
                todo.extend(callee for callee, _ in edges.get(c, ()))
    return roles


def _windowed_edges(comps, roles: dict[str, str]) -> dict[tuple[str, str], str]:
    """{(computation, permute-done name): role} for the permutes XLA peels off a windowed
    einsum loop: the one whose result enters the loop's init tuple (the first shard shift) and
    the one that shifts the loop's result (the last reduce-scatter step)."""
    out = {}
    for comp, instrs in comps.items():
        starts_of = {i.operands[0]: i.name for i in instrs.values()
                     if i.opcode == "collective-permute-start" and i.operands}
        dones_of = {i.operands[0]: i.name for i in instrs.values()
                    if i.opcode == "collective-permute-done" and i.operands}
        for loop in (i for i in instrs.values() if i.opcode == "while"):
            body = next((c for c, k in _callees(loop).items() if k == "body"), None)
            if body not in roles:
                continue
            init = instrs.get(loop.operands[0]) if loop.operands else None
            for name in (init.operands if init is not None and init.opcode == "tuple" else []):
                if instrs.get(name) is not None and instrs[name].opcode.startswith("collective-"):
                    out[(comp, name)] = roles[body]
            for gte in instrs.values():
                if gte.opcode == "get-tuple-element" and gte.operands[:1] == [loop.name]:
                    done = dones_of.get(starts_of.get(gte.name, ""))
                    if done:
                        out[(comp, done)] = roles[body]
    return out


# What an all-reduce stands for: each element of its (possibly tuple) result is a gather when its
# operand is a zero buffer holding this device's shard, a reduce-scatter when every user keeps
# one shard of it, else an all-reduce. TPU7x offloads collectives to its SparseCores as a
# computation of their own, `call-start` → `call-update(start, args...)` → `call-done`, whose
# parameters are the arguments of the call-update and whose result the call-done returns: the
# operands and users are looked up in the caller, through copies and bitcasts.

_PASS_THROUGH = ("bitcast", "copy", "copy-start", "copy-done")


def _param_index(instr: _Instr) -> int | None:
    m = re.match(r"parameter\((\d+)\)", instr.tail)
    return int(m.group(1)) if instr.opcode == "parameter" and m else None


def _offloaded_calls(comps) -> dict[str, tuple[str, list[str], str | None]]:
    """{called computation: (caller, argument names, name of the instruction returning its
    result)} for `call` and `call-start` … `call-done`."""
    out = {}
    for comp, instrs in comps.items():
        for instr in instrs.values():
            if instr.opcode not in ("call", "call-start"):
                continue
            for callee in (c for c, how in _callees(instr).items() if how == "to_apply"):
                if instr.opcode == "call":
                    out[callee] = (comp, instr.operands, instr.name)
                    continue
                chain, args, done = {instr.name}, instr.operands, None
                for later in instrs.values():
                    if later.operands[:1] and later.operands[0] in chain:
                        if later.opcode == "call-update":
                            chain.add(later.name)
                            args = args or later.operands[1:]
                        elif later.opcode == "call-done":
                            done = later.name
                out[callee] = (comp, args, done)
    return out


def _through_copies(comps, comp: str, name: str) -> _Instr | None:
    """The instruction producing `name`, looking past copies and bitcasts."""
    instr = comps[comp].get(name)
    for _ in range(8):
        if instr is None or instr.opcode not in _PASS_THROUGH or not instr.operands:
            return instr
        instr = comps[comp].get(instr.operands[0])
    return instr


def _users_past_copies(users, comp: str, name: str) -> list[tuple[str, _Instr]]:
    """(the name it reads, user) for the users of `name`, copies and bitcasts replaced by
    their users."""
    out, todo, seen = [], [name], set()
    while todo:
        value = todo.pop()
        for u in users[comp].get(value, []):
            if u.name in seen:
                continue
            seen.add(u.name)
            if u.opcode in _PASS_THROUGH:
                todo.append(u.name)
            else:
                out.append((value, u))
    return out


def _keeps_one_shard(comps, users, comp: str, user: _Instr, value: str, shard: int) -> bool:
    """Whether `user` reads only ≤ `shard` values of `value`: a dynamic-slice (or a fusion XLA
    named after one), or a fusion whose parameter for `value` only feeds such slices. Counted in
    values, not bytes: a slicing fusion may also cast (a bf16 gradient's shard read as f32)."""
    if user.opcode == "dynamic-slice" or user.name.startswith("dynamic-slice"):
        return shape_elements(user.shape) <= shard
    if user.opcode != "fusion":
        return False
    body = next((c for c, how in _callees(user).items() if how == "calls"), None)
    if body not in comps:
        return False
    slots = {i for i, o in enumerate(user.operands) if o == value}
    params = [i.name for i in comps[body].values() if _param_index(i) in slots]
    inner = [u for p in params for _, u in _users_past_copies(users, body, p)]
    return bool(inner) and all(u.opcode == "dynamic-slice" and shape_elements(u.shape) <= shard
                               for u in inner)


def _is_zero_buffer_with_shard(comps, comp: str, instr: _Instr | None) -> bool:
    """A dynamic-update-slice into a broadcast: bare, a fusion whose fused ROOT is one (or a
    fusion XLA named after one, with a broadcast operand), or such an output of a multi-output
    fusion (a `get-tuple-element` of it)."""
    if instr is None:
        return False
    index = None
    if instr.opcode == "get-tuple-element":
        index = _tuple_index(comps[comp], instr.name)
        instr = _through_copies(comps, comp, instr.operands[0])
        if instr is None or instr.opcode != "fusion" or index is None:
            return False
    if instr.opcode == "fusion" and _fused_update_of_broadcast(comps, comp, instr, index):
        return True
    if index is not None or "dynamic-update-slice" not in instr.opcode + instr.name:
        return False
    into = [comps[comp].get(o) for o in instr.operands]
    return any(i is not None and "broadcast" in i.opcode + i.name for i in into)


def _fused_update_of_broadcast(comps, comp: str, fusion: _Instr, index: int | None) -> bool:
    """Whether the fusion's output (`index` of its ROOT tuple, or the ROOT itself) is a
    dynamic-update-slice into the parameter a broadcast is passed as."""
    body = next((c for c, how in _callees(fusion).items() if how == "calls"), None)
    instrs = comps.get(body, {})
    out = next((i for i in instrs.values() if i.root), None)
    if out is not None and index is not None:
        ok = out.opcode == "tuple" and index < len(out.operands)
        out = instrs.get(out.operands[index]) if ok else None
    if out is None or out.opcode != "dynamic-update-slice" or not out.operands:
        return False
    into = instrs.get(out.operands[0])
    k = _param_index(into) if into is not None else None
    if k is None or k >= len(fusion.operands):
        return False
    arg = _through_copies(comps, comp, fusion.operands[k])
    return arg is not None and "broadcast" in arg.opcode + arg.name


def _all_reduce_roles(comps) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """{(computation, all-reduce name): [(role, bytes) per element of its result]}."""
    users: dict[str, dict[str, list[_Instr]]] = {}
    for comp, instrs in comps.items():
        users[comp] = collections.defaultdict(list)
        for instr in instrs.values():
            for o in dict.fromkeys(instr.operands):
                users[comp][o].append(instr)
    calls = _offloaded_calls(comps)
    out = {}
    for comp, instrs in comps.items():
        for ar in instrs.values():
            if _collective_kind(ar.opcode) != "all-reduce":
                continue
            group = _group_size(_start_of(instrs, ar).tail, "all-reduce")
            elements = [m.group(0) for m in _ARRAY.finditer(ar.shape)]
            operands = _start_of(instrs, ar).operands
            # Where its result goes: the caller's call-done when this is an offloaded ROOT.
            result_comp, result = comp, ar.name
            if ar.root and comp in calls and calls[comp][2]:
                result_comp, result = calls[comp][0], calls[comp][2]
            roles = []
            for j, element in enumerate(elements):
                src_comp, src = comp, instrs.get(operands[j]) if j < len(operands) else None
                k = _param_index(src) if src is not None else None
                if k is not None and comp in calls and k < len(calls[comp][1]):
                    src_comp = calls[comp][0]
                    src = comps[src_comp].get(calls[comp][1][k])
                if src is not None:
                    src = _through_copies(comps, src_comp, src.name)
                if len(elements) > 1:
                    picks = [u.name for _, u in _users_past_copies(users, result_comp, result)
                             if u.opcode == "get-tuple-element"
                             and re.search(rf"\bindex={j}\b", u.tail)]
                else:
                    picks = [result]
                readers = [r for p in picks for r in _users_past_copies(users, result_comp, p)]
                shard = shape_elements(element) // max(group, 1)
                if group > 1 and _is_zero_buffer_with_shard(comps, src_comp, src):
                    role = "all-gather"
                elif group > 1 and readers and all(
                        _keeps_one_shard(comps, users, result_comp, u, p, shard)
                        for p, u in readers):
                    role = "reduce-scatter"
                else:
                    role = "all-reduce"
                roles.append((role, shape_bytes(element)))
            out[(comp, ar.name)] = roles
    return out


def _start_of(instrs: dict[str, _Instr], instr: _Instr) -> _Instr:
    """An async `-done`'s start (which holds the operands and replica groups), else itself."""
    if instr.opcode.endswith("-done") and instr.operands:
        return instrs.get(instr.operands[0], instr)
    return instr


# --- the collectives ----------------------------------------------------------------------------

def _collective(instr: _Instr, comp: str, starts: dict[str, _Instr]) -> Collective | None:
    kind = _collective_kind(instr.opcode)
    if kind is None:
        return None
    tail = instr.tail
    if instr.opcode.endswith("-done") and instr.operands:   # groups and channel live on the start
        start = starts.get(instr.operands[0])
        tail = start.tail if start is not None else tail
    m = _CHANNEL.search(tail)
    group = _group_size(tail, kind)
    result_bytes = shape_bytes(instr.shape)
    if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
        # TPU writes a reduce-scatter as a fusion `all-reduce-scatter.N` holding an all-reduce of
        # the whole array and a slice.
        kind, result_bytes = "reduce-scatter", result_bytes // max(group, 1)
    return Collective(kind=kind, name=instr.name, computation=comp, result_bytes=result_bytes,
                      group_size=group, channel=int(m.group(1)) if m else None)


def collective_stats(hlo_text: str) -> CollectiveStats:
    """Parses compiled HLO text; see the module docstring for the counting rules."""
    comps, entry = _parse(hlo_text)
    edges, unknown_loops = _call_graph(comps)
    runs = _executions(comps, edges, entry)
    roles = _windowed_roles(comps, edges)
    peeled = _windowed_edges(comps, roles)
    reduce_roles = _all_reduce_roles(comps)
    starts = {i.name: i for instrs in comps.values() for i in instrs.values()
              if i.opcode.endswith("-start")}
    found: dict[tuple, Collective] = {}
    for comp, instrs in comps.items():
        for instr in instrs.values():
            coll = _collective(instr, comp, starts)
            if coll is None:
                continue
            coll.executions = max(runs.get(comp, 0), 1)
            if coll.kind == "collective-permute":
                coll.role = roles.get(comp) or peeled.get((comp, instr.name), coll.kind)
            elif coll.kind == "all-reduce" and (comp, instr.name) in reduce_roles:
                coll.role = _one_role(reduce_roles[(comp, instr.name)])
            # TPU clones one collective into its async start, continuation and done fusions
            # (same channel and shape): those count once. The fused reduce-scatter is called
            # once per use, so it keeps its own key. JAX lowers every explicit shard_map
            # collective with channel_id=1, so channel 1 names no one collective: those count
            # per instruction (an async done with its start).
            fused_rs = coll.kind == "reduce-scatter" and comp.startswith("all-reduce-scatter")
            ident = instr.name
            if instr.opcode.endswith("-done") and instr.operands and instr.operands[0] in starts:
                ident = instr.operands[0]
            key = ((coll.kind, coll.channel, coll.result_bytes)
                   if coll.channel not in (None, 1) and not fused_rs else (coll.kind, comp, ident))
            prev = found.get(key)
            if prev is not None and prev.computation == comp and prev.name != instr.name:
                # Not a clone: two instructions of one computation (explicit collectives that
                # JAX lowers from a shard_map body all carry channel_id=1).
                key = (coll.kind, comp, instr.name)
                prev = found.get(key)
            if prev is None or coll.executions > prev.executions:
                found[key] = coll
    # Only loops that run collectives matter: those are the ones counted too few times.
    holders = {c.computation for c in found.values()}
    unknown = [name for name, body in unknown_loops
               if body and _called_from([body], edges) & holders]
    inside = _called_from([body for _, body in unknown_loops if body], edges)
    collectives = []
    for c in found.values():
        c.in_unknown_loop = c.computation in inside
        parts = reduce_roles.get((c.computation, c.name)) if c.kind == "all-reduce" else None
        collectives.extend(_split_by_role(c, parts) if parts else [c])
    return CollectiveStats(collectives=collectives, unknown_loops=unknown)


def _one_role(parts: list[tuple[str, int]]) -> str:
    """The role of an all-reduce whose elements all have one; else "all-reduce" (it is then
    split by `_split_by_role`)."""
    roles = {role for role, _ in parts}
    return roles.pop() if len(roles) == 1 else "all-reduce"


def _split_by_role(c: Collective, parts: list[tuple[str, int]]) -> list[Collective]:
    """A combined all-reduce whose elements do different things (TPU7x combines weight gathers
    and gradient reductions into one offloaded all-reduce) as one record per role, each with
    the instruction's name and that role's elements' bytes."""
    by_role: dict[str, int] = {}
    for role, n in parts:
        by_role[role] = by_role.get(role, 0) + n
    if len(by_role) == 1:
        return [c]
    return [dataclasses.replace(c, result_bytes=n, role=role)
            for role, n in by_role.items()]


def _called_from(roots: list[str], edges) -> set[str]:
    """The computations `roots` and everything they call, transitively."""
    seen, todo = set(), list(roots)
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo.extend(callee for callee, _ in edges.get(c, ()))
    return seen


def format_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
