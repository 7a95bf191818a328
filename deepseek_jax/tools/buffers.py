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

Left out: when values are live. Two large temporaries in the list may never be live together
(the compiler reuses the space); the list says what dominates, the peak comes from
`memory_analysis()`. Out-of-memory compiles stop before a buffer assignment is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import tempfile

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^\s*value: <\d+ ([\w.\-]+)(?:\{[\d,]*\})? @\d+> \(size=(\d+),offset=\d+\): (.*)$")
_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=.*?metadata=\{op_name="([^"]*)"')
_LAYOUT = re.compile(r"\{[^{}]*\}")


@dataclasses.dataclass(frozen=True)
class Buffer:
    kind: str            # "parameter", "output", "temp" or "constant"
    bytes: int           # per device, as laid out
    shape: str           # e.g. "bf16[3,256,7168,2048]" (layout dropped)
    name: str            # the HLO instruction that defines the value
    op: str              # JAX name stack of that instruction ("" when it has none)


def _kind(header: str) -> str | None:
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


def largest_buffers(assignment: str, hlo_text: str = "", n: int = 8) -> list[Buffer]:
    """The `n` largest values of a buffer assignment (each instruction once), largest first."""
    names = op_names(hlo_text)
    kind, best = None, {}
    for line in assignment.splitlines():
        m = _ALLOCATION.match(line)
        if m:
            kind = _kind(m.group(3))
            continue
        m = _VALUE.match(line)
        if not m or kind is None:
            continue
        name, size, shape = m.group(1), int(m.group(2)), _LAYOUT.sub("", m.group(3)).strip()
        if name not in best or size > best[name].bytes:
            best[name] = Buffer(kind, size, shape, name, names.get(name, ""))
    return sorted(best.values(), key=lambda b: -b.bytes)[:n]


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
    """(compiled, buffer assignment text or "") for a `jax.stages.Lowered`: compiles once with
    XLA's dump directed to a temporary folder (and without the persistent compilation cache)
    and reads the assignment back."""
    with tempfile.TemporaryDirectory(prefix="xla_dump_") as tmp, _without_persistent_cache():
        compiled = lowered.compile(compiler_options={**options, "xla_dump_to": tmp})
        paths = sorted(glob.glob(os.path.join(tmp, "*after_optimizations-buffer-assignment.txt")),
                       key=os.path.getsize)
        text = ""
        if paths:                   # the train step's module is the largest one dumped
            with open(paths[-1]) as f:
                text = f.read()
    return compiled, text
