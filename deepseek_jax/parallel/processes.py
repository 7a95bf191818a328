"""Multi-process runs: every process compiles a program before any process runs it.

XLA's CPU collectives (Gloo) connect the devices of a replica group the first time a program
runs a collective over that group, and wait only 30 seconds for the other processes to arrive
(a fixed deadline inside XLA; once connected, a group's collectives wait 30 minutes). Processes
that compile a large step at different speeds, as on a busy host, can be further apart than
that, and the first one fails with `Gloo context initialization failed: DEADLINE_EXCEEDED`.

  step = together(jax.jit(train_step, ...), "train step")
  state, metrics = step(state, batch)

`together(fn, name)` returns a callable that behaves as `fn`. In a multi-process run, the first
call with each new argument signature (tree, shapes, dtypes, shardings) compiles `fn` ahead of
time (`fn.lower(...).compile()`, which fills jit's own cache, so the call does not compile
again), then waits at the coordination service's barrier until every process has compiled it:
the first run starts on every process within the barrier's release, however long the compiles
took. One process: the call is `fn`'s. Other attributes (`lower`, `shardings`, ...) are `fn`'s.

Every process must call the wrapped programs in the same order with the same signatures, as
SPMD programs already must; the barrier keys count the compiles, so a process that compiles a
program the others do not waits BARRIER_TIMEOUT_S and fails naming the key. Left out: programs
compiled inside JAX's own helpers (`multihost_utils`), and a recompile that jit makes for a
change the signature does not see (weak types, layouts), which then runs unaligned as before.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax

# Seconds a process waits at the barrier for the others to finish compiling (a pod-sized step
# compiles for minutes); past it the barrier fails naming its key.
BARRIER_TIMEOUT_S = 3600
_COMPILES = itertools.count()     # the barrier keys: the same count on every process


def multi_process() -> bool:
    """Whether `jax.distributed` joins several processes (asked without starting a backend)."""
    from jax._src import distributed      # the coordination service's client (as Orbax uses it)
    state = distributed.global_state
    return state.client is not None and (state.num_processes or 1) > 1


def barrier(key: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Every process waits here until all have arrived (the coordination service's barrier: no
    device collective, so no 30-second deadline). `key` must be new on each use."""
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier(key, timeout_s * 1000)


def signature(args: tuple, kwargs: dict) -> tuple:
    """What a compile depends on that changes between calls: the argument tree, and each
    leaf's shape, dtype and sharding (None for host values)."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    return tree, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x)),
                        getattr(x, "sharding", None)) for x in leaves)


class Together:
    """`fn` (a jitted function, or one with a `lower` method), whose first run for each new
    argument signature starts on every process together (module docstring)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.compiled: set[tuple] = set()

    def __call__(self, *args, **kwargs) -> Any:
        if multi_process():
            key = signature(args, kwargs)
            if key not in self.compiled:
                self.fn.lower(*args, **kwargs).compile()
                barrier(f"deepseek_jax/compiled/{next(_COMPILES)}/{self.name}")
                self.compiled.add(key)
        return self.fn(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.fn, attr)


def together(fn: Callable, name: str) -> Together:
    """`fn`, compiled on every process before any runs it (module docstring); `name` labels the
    barrier keys."""
    return Together(fn, name)
