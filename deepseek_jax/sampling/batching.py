"""Groups of samples per prompt (GRPO rollouts): each prompt prefilled once, continuous batching.

  out = generate_groups(variables, config, prompts, group_size=8, max_new_tokens=48,
                        temperature=0.7, eos_id=config.eos_id, rng=jax.random.key(0))
  out.tokens [P·G, N]   out.logprobs [P·G, N]   out.lengths [P·G]
  (row p·G + g is sample g of prompt p: the layout of GRPO's groups)

Shared prefill: the P distinct prompts go through the model once (`loop.prefill`, a P-row cache
of S slots); each prompt's cache rows (the MLA latents c_kv and k_rope of every layer, 576
values per token per layer for V3) and its last-token logits are then handed to its G samples.

Schedules (`schedule`):
  "static"      the P·G rows decode together from the prompts' repeated cache
                (`loop.repeat_rows`, then `generate.plain_decode`) until the longest row ends:
                `generate`'s schedule on the repeated prompts, without the G-fold prefill.
  "continuous"  `slots` rows decode at a time. A slot whose row has ended (EOS or its budget) is
                refilled with the next pending row, in row order: the prompt's prefilled slots
                0 … W−1 (W = prompt width) are copied into the slot's cache, the row's first
                token is drawn from the prompt's last logits, and it decodes from the next step
                on. All of it runs in one jitted `lax.while_loop`: each iteration refills free
                slots (a `lax.cond`, skipped when no slot is free or nothing is pending), then
                takes one decode step for every slot. A finished row costs its slot no more than
                one idle step. Entries a slot's previous row left past the new prompt are never
                read: a query at position p reads slots ≤ p, and a row writes slot p before it
                reads it. Idle slots still go through the step (fixed shapes); their outputs are
                dropped. Once no row is pending, the live rows are moved (cache rows and state)
                to half as many slots whenever they fit, down to `min_phase_slots` (default
                MIN_PHASE_SLOTS; and a multiple of the batch shards' count): a chain of
                while-loops of halving width in the same program (`phase_widths`), so the last
                long rows do not step a mostly idle batch. Each width compiles its own copy of
                the decode step; narrower than a few rows, a step costs no less, so the chain
                stops there. One compile per settings.

Keys: row (p, g) uses fold_in(fold_in(rng, p), g) (`group_keys`; or pass the P·G keys), and its
token k uses fold_in(row key, k), as `generate` does with a row key. A token therefore depends
only on its row's key and logits, not on the schedule or the slot: "continuous", "static" and
`generate` on the repeated prompts with the same row keys give the same tokens (greedy, and
sampled: a draw is a function of its key and its logits), and log-probs that differ only by the
fp32 rounding of matmuls over batches of other sizes (~1e-6; a sampled draw could only differ
if rounding moved a logit across the draw's boundary, which the tests' decisive model rules out).

Speculative decoding (`speculative=True`, MTP depth 1; `speculative.py`) runs on the static
schedule only: the main model's prefill is shared, and MTP's prompt pass (one block) runs per
row, since its last position reads the row's own first token. Continuous batching with
speculative rounds is left out (a slot advances one or two tokens a round, and a refilled slot
would need MTP's prompt pass inside the loop).

Sharding (`mesh`, `rules`, as in `generate`): the variables get the training shardings; the
decode cache splits its rows (the slots, or the P·G rows of the static schedule) over the batch
axes, so their number must divide by the batch axes' size; the P-row prompt cache is left to
the compiler (copied into the slots that read it). At sampling time the MoE routing bias is
used as it stands in the variables and never updated (its update needs a training batch's
loads). With `moe_capacity_factor` > 0 tokens are dropped by training's per-sequence capacity
rule, counted over the tokens of one pass: a prompt's prefill (the same for its G samples,
shared or repeated) and one token per decode step (capacity ⌈f·X/E⌉ ≥ 1 per expert and a
token's X experts are distinct, so decode steps drop nothing). The default, 0 (V3), drops
nothing anywhere.

Left out: speculative rounds in continuous batching; prompts arriving during the run (all P are
prefilled up front: the prompt cache holds P·S latents); paged caches (every slot holds S).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.processes import together
from deepseek_jax.sampling.cache import init_cache
from deepseek_jax.sampling.generate import (PROMPT_BUCKET, check_settings, place_variables,
                                            plain_decode, prepare_prompts, row_limits)
from deepseek_jax.sampling.loop import (Generation, Knobs, Settings, constrain_cache, fold_counts,
                                        fold_keys, pick, prefill, repeat_rows, step_models)
from deepseek_jax.sampling.speculative import speculative_decode

SCHEDULES = ("continuous", "static")
MIN_PHASE_SLOTS = 8      # the narrowest drain phase: a decode step of fewer rows costs as much


# --- the static schedule ---------------------------------------------------------------------

def shared_static_loop(variables, ids, lengths, keys, limits, knobs: Knobs, eos_id, pad_id, *,
                       config: ModelConfig, s: Settings, group_size: int) -> Generation:
    """Prefill the P prompts once, repeat each one's cache G times, decode P·G rows together."""
    G = group_size
    logits, hidden, cache = prefill(variables, ids, lengths, config=config, s=s,
                                    mtp=s.speculative)                          # [P, V]
    cache, logits, row_lengths = repeat_rows(cache, G), jnp.repeat(logits, G, 0), jnp.repeat(
        lengths, G)                                                             # [P·G, ...]
    if s.speculative:
        return speculative_decode(variables, cache, logits, jnp.repeat(hidden, G, 0),
                                  jnp.repeat(ids, G, 0), row_lengths, keys, limits, knobs,
                                  eos_id, pad_id, config=config, s=s)
    return plain_decode(variables, cache, logits, row_lengths, keys, limits, knobs, eos_id,
                        pad_id, config=config, s=s)


# --- the continuous schedule -----------------------------------------------------------------

class Slots(NamedTuple):
    """The continuous loop's state: M slots, R = P·G rows."""
    cache: dict           # {stack: {name: [L, M, S, ...]}}
    row: jax.Array        # [M] the row each slot serves (R: none yet)
    tok: jax.Array        # [M] its last token, the next step's input
    pos: jax.Array        # [M] that token's position
    count: jax.Array      # [M] tokens the row has generated
    live: jax.Array       # [M] bool: the row has not ended
    next_row: jax.Array   # [] the first row not started yet
    steps: jax.Array      # [] decode steps run
    out: jax.Array        # [R, N] tokens
    logprobs: jax.Array   # [R, N]
    lengths: jax.Array    # [R]


def _copy_prompts(cache: dict, prompt_cache: dict, dst, prompt, width: int) -> dict:
    """Slots `dst` [M] (M = leave alone) get prompt rows `prompt` [M], slots 0 … width−1."""
    def copy(key, c, pc):
        if key in ("c_kv", "k_rope"):                                # [L, B, S, .]
            return c.at[:, dst, :width].set(pc[:, prompt, :width], mode="drop")
        return c.at[:, dst, :, :width].set(pc[:, prompt, :, :width], mode="drop")  # [L, B, N, S, .]
    return {name: {k: copy(k, c, prompt_cache[name][k]) for k, c in entries.items()}
            for name, entries in cache.items()}


def _refill(st: Slots, prompts, keys, limits, knobs: Knobs, eos_id, group_size: int) -> Slots:
    """Free slots take the next pending rows: prompt cache copied in, first token drawn."""
    prompt_cache, first_logits, prompt_lengths, width = prompts
    M, R = st.row.shape[0], keys.shape[0]
    free = ~st.live
    new_row = st.next_row + jnp.cumsum(free) - 1                                # [M]
    take = free & (new_row < R)
    row = jnp.where(take, new_row, R)                          # R: out of range, writes dropped
    prompt = jnp.minimum(row // group_size, prompt_lengths.shape[0] - 1)        # [M]
    cache = _copy_prompts(st.cache, prompt_cache, jnp.where(take, jnp.arange(M), M), prompt,
                          width)
    safe = jnp.minimum(row, R - 1)
    tok, lp = pick(first_logits[prompt], fold_keys(keys[safe], 0), knobs)       # [M]
    ended = take & ((tok == eos_id) | (limits[safe] <= 1))
    return st._replace(
        cache=constrain_cache(cache), row=jnp.where(take, row, st.row),
        tok=jnp.where(take, tok, st.tok), pos=jnp.where(take, prompt_lengths[prompt], st.pos),
        count=jnp.where(take, 1, st.count), live=st.live | (take & ~ended),
        next_row=st.next_row + jnp.sum(take, dtype=jnp.int32),
        out=st.out.at[row, 0].set(tok, mode="drop"),
        logprobs=st.logprobs.at[row, 0].set(lp, mode="drop"),
        lengths=st.lengths.at[jnp.where(ended, row, R)].set(1, mode="drop"))


def _step(st: Slots, variables, step_model, keys, limits, knobs: Knobs, eos_id) -> Slots:
    """One decode step for every slot; live slots record their token, ended rows their length."""
    R = keys.shape[0]
    logits, _, cache = step_model.apply(variables, st.tok[:, None], st.pos[:, None], st.cache,
                                        method="decode")                        # [M, 1, V]
    safe = jnp.minimum(st.row, R - 1)
    new, lp = pick(logits[:, 0], fold_counts(keys[safe], st.count), knobs)      # [M]
    row = jnp.where(st.live, st.row, R)
    count = st.count + st.live
    ended = st.live & ((new == eos_id) | (count >= limits[safe]))
    return st._replace(
        cache=cache, tok=new, pos=st.pos + st.live, count=count, live=st.live & ~ended,
        steps=st.steps + 1, out=st.out.at[row, st.count].set(new, mode="drop"),
        logprobs=st.logprobs.at[row, st.count].set(lp, mode="drop"),
        lengths=st.lengths.at[jnp.where(ended, st.row, R)].set(count, mode="drop"))


def phase_widths(slots: int, min_slots: int = 1, floor: int = MIN_PHASE_SLOTS) -> list[int]:
    """Slot counts of the drain phases: `slots`, then halved while the half is at least `floor`
    and a multiple of `min_slots` (the batch shards): e.g. 64, 32, 16, 8."""
    widths = [slots]
    while widths[-1] % (2 * min_slots) == 0 and widths[-1] // 2 >= floor:
        widths.append(widths[-1] // 2)
    return widths


def _compact(st: Slots, width: int) -> Slots:
    """The state on its first `width` slots, live ones first (all of them must fit)."""
    order = jnp.argsort(~st.live, stable=True)[:width]                         # [width]
    cache = jax.tree.map(lambda c: c[:, order], st.cache)                      # [L, width, ...]
    return st._replace(cache=constrain_cache(cache), row=st.row[order], tok=st.tok[order],
                       pos=st.pos[order], count=st.count[order], live=st.live[order])


def continuous_loop(variables, ids, lengths, keys, limits, knobs: Knobs, eos_id, pad_id, *,
                    config: ModelConfig, s: Settings, group_size: int, slots: int,
                    min_slots: int = 1, floor: int = MIN_PHASE_SLOTS) -> Generation:
    """Prefill the P prompts once, then decode P·G rows through `slots` refilled slots; once no
    row is pending, the live rows move to half as many slots whenever they fit, down to `floor`
    (`phase_widths`), so the last long rows do not step a mostly idle batch."""
    W = ids.shape[1]
    R, N = keys.shape[0], s.max_new_tokens
    first_logits, _, prompt_cache = prefill(variables, ids, lengths, config=config, s=s)
    _, step_model = step_models(config, s.cache_kind)
    zeros = jnp.zeros((slots,), jnp.int32)
    st = Slots(constrain_cache(init_cache(config, slots, s.cache_len, kind=s.cache_kind)),
               jnp.full((slots,), R, jnp.int32), zeros, zeros, zeros,
               jnp.zeros((slots,), jnp.bool_), jnp.int32(0), jnp.int32(0),
               jnp.full((R, N), pad_id, jnp.int32), jnp.zeros((R, N), jnp.float32),
               jnp.zeros((R,), jnp.int32))
    refill = functools.partial(_refill, prompts=(prompt_cache, first_logits, lengths, W),
                               keys=keys, limits=limits, knobs=knobs, eos_id=eos_id,
                               group_size=group_size)
    step = functools.partial(_step, variables=variables, step_model=step_model, keys=keys,
                             limits=limits, knobs=knobs, eos_id=eos_id)

    def body(st):
        st = jax.lax.cond(jnp.any(~st.live) & (st.next_row < R), refill, lambda st: st, st)
        return step(st)

    widths = phase_widths(slots, min_slots, floor)
    for i, width in enumerate(widths):
        if i:
            st = _compact(st, width)

        def cond(st, width=width, last=i == len(widths) - 1):
            going = jnp.any(st.live) | (st.next_row < R)
            if last:
                return going
            return going & ((st.next_row < R) | (jnp.sum(st.live) > width // 2))

        st = jax.lax.while_loop(cond, body if i == 0 else step, st)
    none = jnp.zeros((R,), jnp.int32)
    return Generation(st.out, st.logprobs, st.lengths, jnp.repeat(lengths, group_size),
                      st.steps, none, none)


@functools.lru_cache(maxsize=32)
def compiled(config: ModelConfig, s: Settings, schedule: str, group_size: int, slots: int,
             min_slots: int = 1, floor: int = MIN_PHASE_SLOTS):
    """The jitted run for these static settings (cached, so repeated calls do not retrace)."""
    if schedule == "static":
        fn = functools.partial(shared_static_loop, config=config, s=s, group_size=group_size)
    else:
        fn = functools.partial(continuous_loop, config=config, s=s, group_size=group_size,
                               slots=slots, min_slots=min_slots, floor=floor)
    return together(jax.jit(fn), f"{schedule} rollout")


# --- the entry point -------------------------------------------------------------------------

def _typed(rng) -> jax.Array:
    """A typed PRNG key array from typed or raw uint32 keys."""
    rng = jnp.asarray(rng)
    return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def group_keys(rng, prompts: int, group_size: int) -> jax.Array:
    """[P·G] typed keys: row p·G + g gets fold_in(fold_in(rng, p), g)."""
    rng = _typed(rng)
    if rng.shape != ():
        raise ValueError(f"group_keys takes one key; got shape {rng.shape}")
    p, g = np.divmod(np.arange(prompts * group_size), group_size)
    return jax.vmap(lambda p, g: jax.random.fold_in(jax.random.fold_in(rng, p), g))(p, g)


def _group_keys(rng, rows: int, prompts: int, group_size: int) -> jax.Array:
    """The run's row keys: `group_keys` of one key (default key(0)), or the [P·G] keys given."""
    rng = _typed(jax.random.key(0) if rng is None else rng)
    if rng.shape == ():
        return group_keys(rng, prompts, group_size)
    if rng.shape != (rows,):
        raise ValueError(f"rng must be one key or one key per row (P·G = {rows}); got shape "
                         f"{rng.shape}")
    return rng


def _check_groups(group_size: int, schedule: str, slots, rows: int, speculative: bool) -> int:
    """Raises ValueError for group settings that cannot run; returns the slot count."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be at least 1")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use one of {SCHEDULES}")
    if speculative and schedule != "static":
        raise ValueError("speculative=True runs on the static schedule only; pass "
                         "schedule='static' (continuous batching has no speculative rounds)")
    if schedule == "static":
        return rows
    slots = max(1, rows // 4) if slots is None else int(slots)
    if not 1 <= slots <= rows:
        raise ValueError(f"slots={slots} must lie in [1, P·G = {rows}] (rows decoded at once)")
    return slots


def generate_groups(variables: dict, config: ModelConfig, prompts, group_size: int, *,
                    max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, rng=None,
                    schedule: str = "continuous", slots: int | None = None,
                    speculative: bool = False, row_max_new_tokens=None,
                    max_len: int | None = None, pad_id: int = 0, cache_kind: str = "latent",
                    min_phase_slots: int = MIN_PHASE_SLOTS, mesh=None, rules=None) -> Generation:
    """G samples of up to `max_new_tokens` tokens for each of P prompts (module docstring).

    Args:
      variables, config: the model, as for `generate`.
      prompts: the P distinct prompts, a list of id lists (each prefilled once).
      group_size: G, samples per prompt; row p·G + g of the result is sample g of prompt p.
      max_new_tokens, temperature, top_k, top_p, eos_id, max_len, pad_id, cache_kind: as for
        `generate` (max_len: cache slots per row, which must hold the longest prompt plus N).
      rng: one key (row keys by `group_keys`) or P·G keys; required when temperature > 0.
      schedule: "continuous" (refilled slots) or "static" (all rows at once).
      slots: rows decoded at once by the continuous schedule (default ⌊P·G / 4⌋, at least 1).
      speculative: MTP draft-and-verify (static schedule only).
      min_phase_slots: the continuous schedule's narrowest drain phase (`phase_widths`).
      row_max_new_tokens: [P·G] per-row budgets in [1, N] (default N each): a row stops after
        its budget as if an EOS came there.
      mesh, rules: run sharded (both or neither); slots (continuous) or P·G (static) must divide
        by the size of the batch axes.

    Returns:
      a `Generation` over the P·G rows (steps: decode passes after the prefill).

    Raises:
      ValueError: (before compiling) for the cases `generate` rejects (a cache too short for a
        prompt plus N among them) and group settings that cannot run.
    """
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a list of id lists, the P distinct prompts")
    ids, lengths = prepare_prompts(prompts, config)                 # padded with id 0
    P, rows = ids.shape[0], ids.shape[0] * group_size
    M = _check_groups(group_size, schedule, slots, rows, speculative)
    width = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
    S = check_settings(config, lengths, width, max_new_tokens, temperature, top_k, top_p, eos_id,
                       rng, speculative, max_len, cache_kind)
    width = min(width, S)
    ids = np.pad(ids[:, :width], ((0, 0), (0, max(width - ids.shape[1], 0))))   # [P, width]
    keys = _group_keys(rng, rows, P, group_size)
    limits = row_limits(row_max_new_tokens, rows, max_new_tokens)
    s = Settings(max_new_tokens=max_new_tokens, speculative=speculative, cache_len=S,
                 cache_kind=cache_kind)
    knobs = Knobs(jnp.float32(temperature), jnp.int32(top_k or 0),
                  jnp.float32(1.0 if top_p is None else top_p))
    args = [flax.core.meta.unbox(variables), jnp.asarray(ids), jnp.asarray(lengths), keys,
            jnp.asarray(limits), knobs, jnp.int32(-1 if eos_id is None else eos_id),
            jnp.int32(pad_id)]
    run = compiled(config, s, schedule, group_size, M, batch_shards(mesh, rules),
                   max(1, int(min_phase_slots)))
    if mesh is None and rules is None:
        return run(*args)
    if mesh is None or rules is None:
        raise ValueError("pass both mesh and rules (e.g. deepseek_jax.parallel.mesh_and_rules)")
    return _run_sharded(run, args, config, mesh, rules, M, schedule)


def batch_shards(mesh, rules) -> int:
    """How many ways the mesh splits a batch under `rules` (1 without a mesh)."""
    from deepseek_jax import parallel

    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in parallel.batch_axes(rules)]))


def _run_sharded(run, args, config: ModelConfig, mesh, rules, decoded: int,
                 schedule: str) -> Generation:
    """Variables with the training shardings, the small inputs replicated; the loops constrain
    their decode cache's rows to the batch axes."""
    from jax.sharding import NamedSharding, PartitionSpec

    from deepseek_jax import parallel
    from deepseek_jax.train import sharded

    shards = batch_shards(mesh, rules)
    if decoded % shards:
        what = "slots" if schedule == "continuous" else "P·G (prompts × group_size)"
        raise ValueError(f"{what} = {decoded} rows decoded at once must divide by the {shards} "
                         f"batch shards of this mesh; pick a multiple of {shards}")
    sharded.validate(config, mesh, rules, global_batch=decoded)
    variables, *rest = args
    replicated = NamedSharding(mesh, PartitionSpec())
    rest = [jax.tree.map(lambda a: parallel.to_global(a, replicated), a) for a in rest]
    with parallel.sharding_context(mesh, rules):
        return run(place_variables(variables, config, mesh, rules), *rest)
