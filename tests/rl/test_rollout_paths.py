"""GRPO's rollout paths (`rl.rollout`): the same completions, so the same training batch and the
same loss, whichever path samples them; the sampler's log-probs against the trainer's in fp32
and bf16; the rollout settings' errors.

The policy is the `tiny` GRPO config's model (random init, byte tokenizer), the prompts four
arithmetic problems in the compact template, G = 4, sampled at temperature 1.
"""

import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import parallel
from deepseek_jax.configs.grpo import get_config
from deepseek_jax.configs.pretrain import to_model_config
from deepseek_jax.data import tasks
from deepseek_jax.model import init_variables
from deepseek_jax.rl import advantages, rollout
from deepseek_jax.rl.step import grpo_step, target_logprobs
from deepseek_jax.train.step import TrainState

CFG = get_config("tiny")
G, LENGTH, EOS = CFG.rl.group_size, 48, 1
_problems = np.random.default_rng(0)
PROBLEMS = [tasks.arithmetic_problem(_problems, 2, min_digits=2) for _ in range(4)]
PROMPTS = rollout.encode_prompts([p for p in PROBLEMS for _ in range(G)], "compact")


def model(dtype=jnp.float32):
    mc = to_model_config(CFG.model).replace(dtype=dtype)
    return mc, flax.core.meta.unbox(init_variables(jax.random.key(0), mc))


def rl_with(**fields):
    rl = copy.deepcopy(CFG.rl)
    for k, v in fields.items():
        setattr(rl, k, v)
    return rl


def rollout_rows(mc, variables, rl):
    """(completions, training rows with the sampler's log-probs, the trainer's log-probs)."""
    out = rollout.sample(variables, mc, PROMPTS, rl, eos_id=EOS, rng=jax.random.key(7))
    completions = rollout.completion_ids(np.asarray(out.tokens), np.asarray(out.lengths))
    rows = rollout.training_rows(PROMPTS, completions, LENGTH, np.asarray(out.logprobs))
    old = target_logprobs(variables["params"], variables.get("routing", {}),
                          jnp.asarray(rows["tokens"]), mc, rl.temperature)[0]
    return completions, rows, np.asarray(old)


def test_grpo_loss_is_the_same_for_every_rollout_path():
    mc, v = model()
    tx = optax.sgd(1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                       opt_state=tx.init(v["params"]), routing=v.get("routing", {}))
    rl = CFG.rl
    update = jax.jit(lambda s, b: grpo_step(
        s, b, config=mc, tx=tx, temperature=rl.temperature, eps_low=rl.eps_low,
        eps_high=rl.eps_high, beta=0.0, aggregation=rl.aggregation,
        max_len=rl.max_new_tokens)[1])
    got = {}
    for path in rollout.ROLLOUTS:
        completions, rows, old = rollout_rows(mc, v, rl_with(rollout=path))
        # A reward that varies within groups (the random policy earns no task reward): the
        # sum of the completion's ids mod 7, so the advantages are not zero.
        reward = np.array([sum(c) % 7 for c in completions], np.float32)
        batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "mask", "token_mask")}
        batch["advantages"] = jnp.asarray(advantages.group_advantages(reward, G, "group"))
        # Ratios e^0.05, e^0.1, e^0.15 by row, inside the clip. One ratio for every token would
        # make the loss e^c · mean(advantages), zero up to rounding (the advantages of a group
        # sum to zero), and the comparison below empty.
        offsets = 0.05 * (1 + np.arange(old.shape[0]) % 3)
        batch["old_logp"] = jnp.asarray(old - offsets[:, None])
        got[path] = (completions, float(update(state, batch)["loss"]))
    ref_completions, ref_loss = got["repeated"]
    assert ref_loss != 0.0
    assert len({tuple(c) for c in ref_completions[:G]}) > 1       # samples differ in a group
    for path, (completions, loss) in got.items():
        assert completions == ref_completions, path
        assert loss == ref_loss, path         # the same batch: bit for bit the same loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sampler_logprobs_match_the_trainers(dtype):
    """fp32: the bound GRPO's run test holds the sampler to (1e-4: the cached, absorbed
    attention sums in another order than the trainer's, ~1e-6). bf16: both paths round their
    activations to bf16 (unit u = 2^-8) at each of ~k = 4·L + 2 points in series (embedding,
    attention and FFN inputs and outputs per layer, final norm); to first order a logit then
    differs by at most k·u·max|z| between the paths, and a log-prob by at most twice that (it
    is z_t − logsumexp z). That is the bf16 bound, checked with max|z| read off the trainer."""
    mc, v = model(dtype)
    rl = rl_with(rollout="continuous")
    completions, rows, old = rollout_rows(mc, v, rl)
    m = rollout.rollout_metrics({k: np.zeros(len(PROMPTS)) for k in ("total", "accuracy",
                                                                     "format")},
                                completions, np.array([len(c) for c in completions]), rows,
                                old, group_size=G, max_new_tokens=rl.max_new_tokens,
                                eos_id=EOS)
    gap = m["sampler_trainer_logp_gap"]
    if dtype == jnp.float32:
        assert gap < 1e-4
        return
    from deepseek_jax.model import Transformer
    logits = Transformer(mc).apply(v, jnp.asarray(rows["tokens"]))[0]          # [B, T, V]
    bound = 2 * (4 * mc.n_layers + 2) * 2.0**-8 * float(jnp.abs(logits).max())
    assert 0 < gap < bound, (gap, bound)


def test_rollout_settings_errors_name_the_field():
    mc, _ = model()
    with pytest.raises(ValueError, match="rl.rollout='vllm'"):
        rollout.check_rollout(rl_with(rollout="vllm"), mc)
    with pytest.raises(ValueError, match="set rl.rollout='static'"):
        rollout.check_rollout(rl_with(speculative=True), mc)
    with pytest.raises(ValueError, match="mtp_depth=0; set rl.speculative=False"):
        rollout.check_rollout(rl_with(speculative=True, rollout="static"),
                              mc.replace(mtp_depth=0))
    mesh, rules = parallel.mesh_and_rules("dp")
    with pytest.raises(ValueError, match="rl.rollout_slots=4 .* divide by the mesh's 8"):
        rollout.check_rollout(rl_with(rollout_slots=4), mc, mesh, rules)
    rollout.check_rollout(rl_with(rollout_slots=8), mc, mesh, rules)
    with pytest.raises(ValueError, match="prompt 1 differs from prompt 0"):
        rollout.distinct_prompts([[0, 1], [0, 2]], 2)
