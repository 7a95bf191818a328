"""Run schedules as fractions of the run: the batch-size ramp and the values that follow it.

DeepSeek-V3 (§4.2) changes four things along its 14.8T-token pretraining run, each at a token
count: the batch grows from 3072 to 15360 sequences over the first 469B tokens; the learning rate
warms up for 2K steps, stays constant until 10T tokens, decays by a cosine to 2.2e-5 over 4.3T
and ends at 2.2e-5 then 7.3e-6 for the last 500B; the MTP weight λ is 0.3 until 10T, then 0.1;
the bias update speed γ is 0.001, then 0 for the last 500B. Here every point is a fraction of
the run's tokens, so the same schedule scales to a run of any length.

`Progress` says how far a run is at each step. With a batch ramp, step s consumes
`microbatches(s)` micro-batches of a fixed size (sequences × length), so tokens are counted in
micro-batches and the fraction at step s is (micro-batches before s) / (micro-batches in the
run). The ramp is linear in tokens, in whole micro-batches: with micro-batches of m sequences,
k = start/m … end/m per step, each count k < end/m held for an equal share of the ramp's
tokens. Every step compiles to the same program: the train step always scans `end/m`
micro-batch slots and skips the empty ones (`train.step`, batch["active"]), so growing the
batch never recompiles.

`piecewise_constant` (here) and `optimizer.deepseek_v3_learning_rate` build step → value
functions that jit traces (the step is a traced int); `assemble_microbatches` lays out one step's micro-batches
for the train step; `StepSettings` carries λ, α and γ into it; `from_run_config` builds all of
it from a pretraining run config (fields documented in `deepseek_jax.configs.pretrain`).

Left out: ramps in units other than whole micro-batches (the batch size is always a multiple of
the micro-batch size).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from deepseek_jax.train.optimizer import learning_rate_schedule


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run of `steps` optimizer steps stands at each step.

    stage_starts[i] is the first step of stage i, whose steps take stage_microbatches[i]
    micro-batches each; the last stage runs to the end.
    """
    steps: int
    stage_starts: tuple[int, ...]
    stage_microbatches: tuple[int, ...]

    def microbatches(self, step: int) -> int:
        """Micro-batches of step `step` (a Python int: the loop reads that many)."""
        i = int(np.searchsorted(self.stage_starts, step, side="right")) - 1
        return self.stage_microbatches[max(i, 0)]

    def _seen(self, step):
        """Micro-batches consumed before `step` (traceable; float32)."""
        starts = jnp.asarray(self.stage_starts, jnp.float32)                 # [S]
        ks = jnp.asarray(self.stage_microbatches, jnp.float32)               # [S]
        ends = jnp.asarray(self.stage_starts[1:] + (self.steps,), jnp.float32)
        step = jnp.asarray(step, jnp.float32)
        done = jnp.clip(jnp.minimum(step, ends) - starts, 0.0, None)        # [S] steps per stage
        return jnp.sum(done * ks)

    @property
    def total_microbatches(self) -> int:
        ends = self.stage_starts[1:] + (self.steps,)
        return sum((e - s) * k for s, e, k in zip(self.stage_starts, ends,
                                                  self.stage_microbatches))

    def fraction(self, step):
        """Share of the run's tokens consumed before `step` (traceable; 0 at step 0)."""
        return self._seen(step) / float(max(self.total_microbatches, 1))


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The train step's settings that belong to the run, not to the model: the MTP loss weight λ,
    the balance-loss weight α and the routing-bias update speed γ. λ and γ are constants or
    traceable step → value functions (`piecewise_constant`). Defaults are V3's (§4.2)."""
    mtp_weight: float | Callable = 0.3          # λ: total = LM + λ·MTP + α·balance
    balance_alpha: float = 1e-4                 # α of the sequence-wise balance loss
    bias_update_rate: float | Callable = 0.001  # γ: b += γ·sign(mean_load − load) per step

    def at(self, step):
        """(λ, γ) at `step` (a traced int inside the train step)."""
        value = lambda x: x(step) if callable(x) else x
        return value(self.mtp_weight), value(self.bias_update_rate)

    @property
    def scheduled(self) -> tuple[str, ...]:
        """Names of the settings that change along the run (the train step logs them)."""
        return tuple(name for name in ("mtp_weight", "bias_update_rate")
                     if callable(getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a pretraining loop needs from the run config's schedule fields."""
    progress: Progress
    learning_rate: Callable            # step → lr, for the optimizer
    train: StepSettings                # λ, α and γ, for the train step
    slots: int                         # micro-batch slots of the compiled step
    microbatch_rows: int               # sequences per micro-batch
    ramp: bool                         # whether steps take fewer than `slots` micro-batches


def from_run_config(config) -> RunPlan:
    """The schedules of a pretraining run config: `train.batch_ramp_start` (sequences; 0 = no
    ramp) and `train.batch_ramp_fraction`, `train.mtp_weight_schedule` and
    `train.bias_rate_schedule` ((fraction, value) points; empty = the constants `train.mtp_weight`
    and `train.bias_update_rate`), `train.balance_alpha`, and
    the optimizer's schedule fields (`optim.schedule` etc., see `train.optimizer`)."""
    train, optim = config.train, config.optim
    slots = int(train.microbatches)
    batch = int(config.data.global_batch)
    if batch % slots:
        raise ValueError(f"data.global_batch={batch} is not divisible by train.microbatches="
                         f"{slots}")
    rows = batch // slots
    ramp_start = int(train.get("batch_ramp_start", 0) or 0)
    if ramp_start and ramp_start % rows:
        raise ValueError(f"train.batch_ramp_start={ramp_start} sequences is not a whole number "
                         f"of micro-batches of {rows} (global_batch / microbatches)")
    progress = make_progress(int(train.steps), slots, ramp_start // rows,
                             float(train.get("batch_ramp_fraction", 0.0) or 0.0))
    lr = learning_rate_schedule(
        optim.lr, optim.warmup_steps, train.steps, kind=optim.schedule,
        final_fraction=optim.final_fraction, fraction=progress.fraction,
        constant_until=float(optim.get("constant_until", 0.0)),
        cosine_until=float(optim.get("cosine_until", 1.0)), tail=tuple(optim.get("tail", ())))
    points = lambda name: tuple(train.get(name, ()) or ())
    scheduled = lambda name, constant: (piecewise_constant(points(name), progress.fraction)
                                        if points(name) else float(constant))
    settings = StepSettings(
        mtp_weight=scheduled("mtp_weight_schedule", train.mtp_weight),
        balance_alpha=float(train.balance_alpha),
        bias_update_rate=scheduled("bias_rate_schedule", train.bias_update_rate))
    return RunPlan(progress, lr, settings,
                   slots, rows, len(progress.stage_starts) > 1)


def make_progress(steps: int, microbatches: int, ramp_start: int = 0,
                  ramp_fraction: float = 0.0) -> Progress:
    """A run of `steps` steps ending at `microbatches` micro-batches per step.

    Args:
      steps: optimizer steps of the run.
      microbatches: micro-batches per step once the ramp is over (the full batch).
      ramp_start: micro-batches per step at the start of the ramp; 0 (or `microbatches`) = no
        ramp.
      ramp_fraction: share of the run's tokens over which the batch grows (linear in tokens).

    The ramp's step counts follow from the token shares: with U micro-batches in the whole run,
    count k (ramp_start ≤ k < microbatches) lasts ramp_fraction·U/n micro-batches, n =
    microbatches − ramp_start, i.e. that many / k steps, and the rest of the run takes
    (1 − ramp_fraction)·U/microbatches steps. U is solved from `steps`; step counts are rounded.
    """
    K, k0 = microbatches, ramp_start or microbatches
    if not 1 <= k0 <= K:
        raise ValueError(f"batch ramp start {k0} micro-batches must lie in [1, {K}]")
    if k0 == K or ramp_fraction <= 0:
        return Progress(steps, (0,), (K,))
    if not 0 < ramp_fraction < 1:
        raise ValueError(f"batch ramp fraction {ramp_fraction} must lie in (0, 1)")
    ks = list(range(k0, K))
    n = len(ks)
    per_unit = ramp_fraction / n * sum(1.0 / k for k in ks) + (1 - ramp_fraction) / K
    units = steps / per_unit                                     # U, micro-batches in the run
    stage_steps = [max(1, round(ramp_fraction * units / n / k)) for k in ks]
    if sum(stage_steps) >= steps:
        raise ValueError(f"a batch ramp over {ramp_fraction:.3%} of the run needs more than "
                         f"its {steps} steps; lengthen the run or shorten the ramp")
    starts = tuple(int(s) for s in np.cumsum([0] + stage_steps))
    return Progress(steps, starts, tuple(ks) + (K,))


def steps_for_tokens(tokens: float, tokens_per_microbatch: int, microbatches: int,
                     ramp_start: int = 0, ramp_fraction: float = 0.0) -> int:
    """Optimizer steps of a run of `tokens` tokens (`make_progress`'s arguments otherwise)."""
    K, k0 = microbatches, ramp_start or microbatches
    units = tokens / tokens_per_microbatch
    if k0 == K or ramp_fraction <= 0:
        return round(units / K)
    ks = range(k0, K)
    n = len(ks)
    return round(units * (ramp_fraction / n * sum(1.0 / k for k in ks)
                          + (1 - ramp_fraction) / K))


def piecewise_constant(points: Sequence[Sequence[float]], fraction: Callable):
    """step → the value of the last (fraction, value) point whose fraction ≤ fraction(step).

    `points` are sorted by fraction and start at 0, e.g. ((0, 0.3), (10 / 14.8, 0.1)).
    """
    points = [(float(f), float(v)) for f, v in points]
    if not points or points[0][0] != 0.0 or any(a[0] > b[0] for a, b in zip(points, points[1:])):
        raise ValueError(f"schedule points {points} must start at fraction 0 and be sorted")

    def value(step):
        f = fraction(step)
        out = jnp.float32(points[0][1])
        for at, v in points[1:]:
            out = jnp.where(f >= at, jnp.float32(v), out)
        return out
    return value


def assemble_microbatches(parts: Sequence[dict], slots: int) -> dict:
    """One step's batch from k ≤ `slots` micro-batches of m rows each (NumPy dicts [m, ...]).

    Rows are interleaved so that the train step's strided split (micro-batch i = rows i,
    i + slots, i + 2·slots, …) gives back parts[i]; slots past k are zeros. `active`
    [slots·m, T] (shaped like the tokens, so it shards like them) is 1 on the rows of the k
    real micro-batches.
    """
    if not 1 <= len(parts) <= slots:
        raise ValueError(f"{len(parts)} micro-batches for {slots} slots")
    m = len(next(iter(parts[0].values())))
    out = {}
    for key in parts[0]:
        blank = np.zeros_like(np.asarray(parts[0][key]))
        stack = [np.asarray(p[key]) for p in parts] + [blank] * (slots - len(parts))
        arr = np.stack(stack, axis=1)                                 # [m, slots, ...]
        out[key] = arr.reshape(m * slots, *arr.shape[2:])             # [m·slots, ...]
    active = np.zeros((m, slots) + np.shape(parts[0]["tokens"])[1:], np.float32)
    active[:, : len(parts)] = 1.0
    out["active"] = active.reshape(m * slots, *active.shape[2:])
    return out
