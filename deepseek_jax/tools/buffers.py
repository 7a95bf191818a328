"""The largest buffers of a compiled program, from the compiler's own buffer assignment.

  text = buffer_assignment(lowered)            # compiles with XLA's dump switched on
  top = largest_buffers(text, compiled.as_text(), n=8)
  # [Buffer(kind="temp", bytes=..., shape="bf16[3,256,7168,2048]", name="fusion.12",
  #         op="transpose(jvp(Transformer))/.../moe/dot_general"), ...]

JAX's `Compiled` object reports totals (`memory_analysis()`: arguments, outputs, temporaries)
but not what they are made of; the buffer assignment that XLA writes next to a dumped module
(`*after_optimizations-buffer-assignment.txt`, with `compiler_options={"xla_dump_to": DIR}`) lists
every allocation and every value placed in it: the instruction, its size and shape. Parameters
and outputs get one allocation each; the temporaries share one `preallocated-temp` allocation in
which values sit at offsets for the part of the program they are live in.

What a row says: the largest values by size, each with the op that produced it (the JAX name
stack from the instruction's `metadata={op_name=...}`, so the model's module path shows), and
whether it is a parameter, an output or a temporary. Sizes are as laid out on the device (TPU
tile padding included), per device.

What is live at the peak: the same dump holds the module's live ranges
(`*after_optimizations-live-range.txt`): the instruction sequence of the whole module, and the
values live at the step where their sum is largest ("Live ranges at N (peak)"). `peak_buffers`
reads that set, largest first, with shapes and kinds from the assignment and ops from the HLO:
unlike the largest values, these are all in memory at once, so they are what to shrink for the
step to fit. Several of those values can be one piece of memory: a loop's result and the carried
value its body updated in place (the loop's result is a `(phi)` value in the assignment), or an
in-place update and the buffer it writes into. The live-range dump counts each; `peak_buffers`
counts the bytes they occupy: the union of their [offset, offset + size) in each allocation, as
laid out, and lists each piece of memory once. What is left between that sum and the compiler's
total is the allocator's placement: gaps between values, and memory the peak's values do not use.
Values in host memory (activations a remat policy offloads) are listed by `largest_buffers` as
kind "host" and left out of the peak, which is the device's. On GPU, values in collective memory
(color 1) are counted with the rest; `gpu_collective_memory` gives that allocation's size.

Left out: out-of-memory compiles stop before a buffer assignment is written. The peak's step is
the dump's, chosen by its own count (each value once, shared memory twice); the step where the
occupied bytes are largest may be another one, which this does not search for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import tempfile

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
# Host memory: XLA's memory space 5 (`S(5)` in a layout), an allocation's "color 5", where
# offloaded activations live.
_HOST = re.compile(r"\bcolor 5\b")
# XLA:GPU's collective memory: an allocation of color 1 (`S(1)` in a layout), apart from the
# other temporaries, for the ragged all-to-all's output buffers and the values laid out with them.
_GPU_COLLECTIVE = re.compile(r"\bcolor 1\b")
# A value: its instruction, tuple index, "(phi)" for a loop's or conditional's result (which
# shares the memory of what flows into it), size and offset in the allocation, shape.
_VALUE = re.compile(r"^\s*value: <\d+ ([\w.\-]+)(\{[\d,]*\})?( \(phi\))? @\d+> "
                    r"\(size=(\d+),offset=(\d+)\): (.*)$")
_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=.*?metadata=\{op_name="([^"]*)"')
_LAYOUT = re.compile(r"\{[^{}]*\}")
_PEAK = re.compile(r"^\s*Live ranges at \d+ \(peak\):")
_LIVE = re.compile(r"^\s*([\w.\-]+)(\{[\d,]*\}): (\d+) bytes")


@dataclasses.dataclass(frozen=True)
class Buffer:
    kind: str            # "parameter", "output", "temp", "constant" or "host" (memory)
    bytes: int           # per device, as laid out
    shape: str           # e.g. "bf16[3,256,7168,2048]" (layout dropped)
    name: str            # the HLO instruction that defines the value
    op: str              # JAX name stack of that instruction ("" when it has none)


def _kind(header: str) -> str | None:
    if _HOST.search(header):
        return "host"
    if "parameter" in header:
        return "parameter"
    if "output" in header or "live-out" in header:
        return "output"
    if "preallocated-temp" in header:
        return "temp"
    if "constant" in header:
        return "constant"
    return None                 # thread-local scalars and the like


def op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: JAX op_name} from compiled HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _OP_NAME.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@dataclasses.dataclass(frozen=True)
class _Placed:
    buffer: Buffer
    allocation: int
    offset: int
    phi: bool            # a loop's or conditional's result: the memory of another value


def _values(assignment: str, names: dict[str, str]) -> dict[tuple[str, str], _Placed]:
    """{(instruction, tuple index): where the buffer assignment puts that value}, the largest
    placement where a value appears in several allocations."""
    kind, allocation, best = None, -1, {}
    for line in assignment.splitlines():
        m = _ALLOCATION.match(line)
        if m:
            kind, allocation = _kind(m.group(3)), int(m.group(1))
            continue
        m = _VALUE.match(line)
        if not m or kind is None:
            continue
        name, index, size = m.group(1), m.group(2) or "{}", int(m.group(4))
        shape = _LAYOUT.sub("", m.group(6)).strip()
        key = (name, index)
        if key not in best or size > best[key].buffer.bytes:
            best[key] = _Placed(Buffer(kind, size, shape, name, names.get(name, "")),
                                allocation, int(m.group(5)), bool(m.group(3)))
    return best


def largest_buffers(assignment: str, hlo_text: str = "", n: int = 8) -> list[Buffer]:
    """The `n` largest values of a buffer assignment (each instruction once, a loop's result
    left out for the value it carries), largest first."""
    best = {}
    for p in _values(assignment, op_names(hlo_text)).values():
        b = p.buffer
        if not p.phi and (b.name not in best or b.bytes > best[b.name].bytes):
            best[b.name] = b
    return sorted(best.values(), key=lambda b: -b.bytes)[:n]


def allocated_bytes(memory) -> int:
    """Every allocation of a compiled program, from its `memory_analysis()`: the arguments,
    the outputs not aliased to donated arguments, and each temporary allocation whole (on GPU,
    collective memory included). The planner's total on GPU and CPU; on TPU it takes the
    compiler's peak."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def gpu_collective_memory(assignment: str) -> int:
    """Bytes of an XLA:GPU buffer assignment's collective-memory allocations (color 1), part of
    `Compiled.memory_analysis().temp_size_in_bytes`. Only GPU assignments give color 1 this
    meaning."""
    return sum(int(m.group(2)) for m in map(_ALLOCATION.match, assignment.splitlines())
               if m and _GPU_COLLECTIVE.search(m.group(3)))


def _occupied(places: list[_Placed]) -> int:
    """Bytes covered by the [offset, offset + size) of `places`, allocation by allocation."""
    total = 0
    by_allocation: dict[int, list[tuple[int, int]]] = {}
    for p in places:
        by_allocation.setdefault(p.allocation, []).append((p.offset, p.offset + p.buffer.bytes))
    for spans in by_allocation.values():
        end = 0
        for lo, hi in sorted(spans):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


def peak_buffers(live_range: str, assignment: str, hlo_text: str = "",
                 n: int | None = 8) -> tuple[list[Buffer], int]:
    """(the `n` largest pieces of memory live at the module's memory peak, largest first, or
    all of them for n=None; the bytes all of them occupy) from the live-range dump; ([], 0) when
    it has no peak section.

    Values at one place of one allocation (a loop's result and what it carries) are one row:
    the value that is not a loop's result, which names the op that wrote it. A value the
    assignment does not place counts at the live-range dump's size."""
    names = op_names(hlo_text)
    known = _values(assignment, names)
    lines = iter(live_range.splitlines())
    if not any(_PEAK.match(line) for line in lines):
        return [], 0
    placed: dict[tuple[int, int, int], _Placed] = {}
    unplaced: list[Buffer] = []
    for line in lines:                      # the peak's values, up to the next section
        m = _LIVE.match(line)
        if not m:
            break
        name, index, size = m.group(1), m.group(2), int(m.group(3))
        p = known.get((name, index))
        if p is not None and p.buffer.kind == "host":
            continue                        # in host memory: not the device's to hold
        if p is None:
            unplaced.append(Buffer("temp", size, "", name, names.get(name, "")))
            continue
        where = (p.allocation, p.offset, p.buffer.bytes)
        if where not in placed or (placed[where].phi and not p.phi):
            placed[where] = p
    rows = [p.buffer for p in placed.values()] + unplaced
    occupied = _occupied(list(placed.values())) + sum(b.bytes for b in unplaced)
    return sorted(rows, key=lambda b: -b.bytes)[:n], occupied


@contextlib.contextmanager
def _without_persistent_cache():
    """JAX leaves the dump options out of its persistent cache key, so an executable served from
    that cache comes with no dump. JAX decides once per process whether the cache is used
    (`compilation_cache.is_cache_used`); this resets that decision around one compile with the
    cache switched off, and resets it again after. Private JAX API: without it, the compile
    may come from the cache and the breakdown is then empty."""
    try:
        from jax._src import compilation_cache, config as jax_config
        off = jax_config.enable_compilation_cache(False)
        reset = compilation_cache.reset_cache
    except (ImportError, AttributeError):
        yield
        return
    reset()
    try:
        with off:
            yield
    finally:
        reset()


def compile_with_assignment(lowered, **options):
    """(compiled, buffer assignment text or "", live-range text or "") for a
    `jax.stages.Lowered`: compiles once with XLA's dump directed to a temporary folder (and
    without the persistent compilation cache) and reads both back."""
    suffix = "after_optimizations-buffer-assignment.txt"
    with tempfile.TemporaryDirectory(prefix="xla_dump_") as tmp, _without_persistent_cache():
        compiled = lowered.compile(compiler_options={**options, "xla_dump_to": tmp})
        paths = sorted(glob.glob(os.path.join(tmp, f"*{suffix}")), key=os.path.getsize)
        text = live = ""
        if paths:                   # the train step's module is the largest one dumped
            with open(paths[-1]) as f:
                text = f.read()
            ranges = paths[-1][:-len(suffix)] + "after_optimizations-live-range.txt"
            if os.path.exists(ranges):
                with open(ranges) as f:
                    live = f.read()
    return compiled, text, live
