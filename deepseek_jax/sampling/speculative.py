"""MTP speculative decoding: MTP depth 1 drafts the next token, the main model verifies it.

V3 trains one MTP module that predicts the token after next (spec §4); at inference it can draft,
and V3 reports 85–90% acceptance of the drafted token (about 1.8× tokens per second). Here, per
row, with x_{m−1} the last committed token (not yet fed to the main model) and d the draft for
x_m, one round is:

  1. verify    main model on [x_{m−1}, d] at positions [m−1, m] (one pass, T = 2):
               p_m from position m−1, p_{m+1} from position m (which assumed x_m = d).
  2. accept    greedy: x_m = argmax p_m, accepted iff it equals d;
               sampling: accept d with probability min(1, p_m(d)/q(d)), else draw x_m from the
               residual max(0, p_m − q) (`sample.speculative_accept`), so x_m ~ p_m exactly.
               If accepted, x_{m+1} is drawn from p_{m+1} (a bonus token): 1 or 2 tokens a round.
  3. draft     MTP depth 1 on the verify pass's hidden states and the tokens that follow them,
               [x_m, x_{m+1}] at positions [m−1, m], and the next draft comes from the last
               position whose next token is committed (m if accepted, else m−1).

Rejected positions leave stale entries in the main and MTP caches one slot past the committed
tokens; the next round writes those slots before anything reads them (a query at position p
reads slots ≤ p, and each round writes its own slots first). p and q are the sampling
distributions (tempered, top-k / top-p truncated), so accepted tokens follow exactly the
distribution plain sampling draws from; the reported log-probs are those of the main model, as
in plain decoding. Keys: round r uses fold_in(row key, r) and a purpose id, so speculative
sampling reproduces but draws differently from plain sampling.

The prefill runs the main model over the prompts, picks x_len, then runs MTP over the prompt
positions with the prompt shifted left by one (x_len after the last prompt token) and drafts
from position len − 1.

Left out: drafting several tokens (chaining MTP depths or re-running depth 1), tree drafts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.mtp import shift_left
from deepseek_jax.sampling.loop import (Generation, Knobs, Settings, fold_keys, pick, prefill,
                                        step_models)
from deepseek_jax.sampling.sample import (choose, sampling_probs, speculative_accept,
                                          token_logprobs)

_FIRST, _DRAFT, _ACCEPT, _BONUS = range(4)  # purposes folded into a round's key


def _draft(logits, keys, knobs: Knobs):
    """(draft tokens [B], the distribution q [B, V] they were drawn from; zeros when greedy)."""
    tokens = choose(logits, keys, knobs.temperature, knobs.top_k, knobs.top_p)
    q = jax.lax.cond(knobs.temperature <= 0, jnp.zeros_like,
                     lambda x: sampling_probs(x, knobs.temperature, knobs.top_k, knobs.top_p),
                     logits)                                                  # [B, V]
    return tokens, q


def _verify(logits, draft, q, keys, knobs: Knobs):
    """(x_m [B], draft accepted [B]) from the main logits [B, V] at the draft's position."""
    def greedy(logits):
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)                  # [B]
        return best, best == draft

    def sampled(logits):
        p = sampling_probs(logits, knobs.temperature, knobs.top_k, knobs.top_p)  # [B, V]
        return speculative_accept(p, q, draft, keys)

    return jax.lax.cond(knobs.temperature <= 0, greedy, sampled, logits)


def speculative_loop(variables, ids, lengths, keys, limits, knobs: Knobs, eos_id, pad_id, *,
                     config: ModelConfig, s: Settings) -> Generation:
    """Same arguments and result as `generate._plain_loop`, with MTP drafts (see the docstring)."""
    logits, hidden, cache = prefill(variables, ids, lengths, config=config, s=s, mtp=True)
    return speculative_decode(variables, cache, logits, hidden, ids, lengths, keys, limits, knobs,
                              eos_id, pad_id, config=config, s=s)


def speculative_decode(variables, cache, logits, hidden, ids, lengths, keys, limits,
                       knobs: Knobs, eos_id, pad_id, *, config: ModelConfig,
                       s: Settings) -> Generation:
    """The rounds after the main model's prefill (`loop.prefill` with mtp=True: its logits [B, V],
    hidden [B, P, D] and cache, for prompts ids [B, P]): the first token, MTP's prompt pass,
    then draft-and-verify rounds; row b stops at EOS or after limits[b] ≤ N tokens."""
    B, P = ids.shape
    N = s.max_new_tokens
    rows = jnp.arange(B)
    prefill_model, step_model = step_models(config, s.cache_kind)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))       # [B, P]
    first, lp = pick(logits, fold_keys(keys, 0, _FIRST), knobs)                 # [B]
    following = shift_left(ids, 1).at[rows, lengths - 1].set(first)             # [B, P]
    draft_logits, cache = prefill_model.apply(variables, hidden, following, positions, cache,
                                              (lengths - 1)[:, None], method="draft")  # [B, 1, V]
    draft, q = _draft(draft_logits[:, 0], fold_keys(keys, 0, _DRAFT), knobs)

    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first)              # [B, N]
    logprobs = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp)                  # [B, N]
    count = jnp.ones((B,), jnp.int32)
    done = (first == eos_id) | (count >= limits)
    zeros = jnp.zeros((B,), jnp.int32)

    def cond(state):
        r, *_, done, _, _ = state
        return (r <= N) & ~jnp.all(done)

    def body(state):
        r, cache, last, draft, q, pos, out, logprobs, count, done, drafted, accepted = state
        pair = pos[:, None] + jnp.arange(2, dtype=jnp.int32)                    # [B, 2]
        logits, hidden, cache = step_model.apply(
            variables, jnp.stack([last, draft], 1), pair, cache, method="decode")  # [B, 2, V]
        x0, ok = _verify(logits[:, 0], draft, q, fold_keys(keys, r, _ACCEPT), knobs)  # [B]
        x1, lp1 = pick(logits[:, 1], fold_keys(keys, r, _BONUS), knobs)        # [B]
        lp0 = token_logprobs(logits[:, 0], x0, knobs.temperature)               # [B]

        live = ~done
        could = live & (count + 1 < limits)           # room for the draft to become a token
        two = could & ok & (x0 != eos_id)             # the bonus token is emitted too
        at0 = jnp.where(live, count, N)               # N = out of range: dropped
        at1 = jnp.where(two, count + 1, N)
        out = out.at[rows, at0].set(x0, mode="drop").at[rows, at1].set(x1, mode="drop")
        logprobs = (logprobs.at[rows, at0].set(lp0, mode="drop")
                    .at[rows, at1].set(lp1, mode="drop"))
        count = count + live + two
        done = done | (live & ((x0 == eos_id) | (two & (x1 == eos_id)) | (count >= limits)))
        drafted = drafted + could
        accepted = accepted + (could & ok)

        step = two.astype(jnp.int32)                  # 1: committed through x_{m+1}
        draft_logits, cache = step_model.apply(
            variables, hidden, jnp.stack([x0, x1], 1), pair, cache, step[:, None],
            method="draft")                                                     # [B, 1, V]
        draft, q = _draft(draft_logits[:, 0], fold_keys(keys, r, _DRAFT), knobs)
        last = jnp.where(two, x1, x0)
        return (r + 1, cache, last, draft, q, pos + 1 + step, out, logprobs, count, done,
                drafted, accepted)

    state = (jnp.int32(1), cache, first, draft, q, lengths, out, logprobs, count, done,
             zeros, zeros)
    r, *_, out, logprobs, count, _, drafted, accepted = jax.lax.while_loop(cond, body, state)
    return Generation(out, logprobs, count, lengths, r - 1, drafted, accepted)
