"""Shared test models for the sampler: the tiny config (fp32, every feature on) with weights made
decisive, and a variant whose MTP module agrees with the main model most of the time.

Random tiny weights give near-uniform logits (std ~0.1), so argmax choices would hang on tiny
differences and batched and unbatched runs could part over fp32 rounding. Scaling the weights
(as tests/model/test_transformer.py does) and the output head makes every choice clear.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import get_config
from deepseek_jax.model import Transformer, init_variables

PROMPTS = [[0, 5, 9, 11, 3], [0, 7, 2], [0, 12, 2, 3, 4, 5, 6, 7]]  # one width bucket (8)
WIDTH = 32  # full-forward width used for reference log-probs


def tiny():
    return get_config("tiny")


@functools.lru_cache(maxsize=None)
def decisive_variables():
    c = tiny()
    v = flax.core.meta.unbox(init_variables(jax.random.key(0), c))
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, v["params"])
    params["lm_head"] = params["lm_head"] * 10.0
    return {**v, "params": params}


@functools.lru_cache(maxsize=None)
def aligned_variables():
    """MTP agrees with the main model on about half of its greedy drafts (~48% accepted).

    Attention and FFN outputs are scaled down so each hidden state is mostly its token's
    embedding, and eh_proj passes the embedding through: MTP at position i then sees about what
    the main model sees at i + 1, and drafts about what the main model will choose there.
    """
    c = tiny()
    v = decisive_variables()
    small = {"w_o", "w_down"}
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p / 3.0 if getattr(path[-1], "key", None) in small else p, v["params"])
    params["embed"] = params["embed"] * 5.0
    D = c.d_model
    eh = params["mtp"]["layer_0"]["eh_proj"]                            # [2D, D]
    params["mtp"]["layer_0"]["eh_proj"] = jnp.concatenate([jnp.eye(D), eh[D:] * 0.5])
    return {**v, "params": params}


@functools.lru_cache(maxsize=None)
def forward():
    """Jitted full forward (the trainer's computation): variables, tokens [B, T] → logits."""
    c = tiny()
    return jax.jit(lambda v, t: Transformer(c).apply(v, t)[0])


def trainer_logprobs(variables, prompt, generated, temperature=1.0):
    """log_softmax(apply(prompt + generated)[0] / T) at the generated tokens, float64 numpy,
    and those tempered logits. The sequence is padded to a fixed width (one compile; causal, so
    the padding cannot change the logits before it)."""
    seq = list(prompt) + list(generated)
    assert len(seq) <= WIDTH
    tokens = jnp.asarray([seq + [0] * (WIDTH - len(seq))], jnp.int32)
    logits = np.asarray(forward()(variables, tokens)[0], np.float64)   # [WIDTH, V]
    logits = logits[len(prompt) - 1:len(seq) - 1] / temperature
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(generated)[:, None], 1)[:, 0], logits


def row(out, b):
    """(generated ids, log-probs) of row b, cut at its length."""
    n = int(out.lengths[b])
    return np.asarray(out.tokens[b, :n]), np.asarray(out.logprobs[b, :n])
