"""GRPO with verifiable rewards, `train_and_evaluate(config, workdir)`; the command line is
`python -m experiments.grpo --config=experiments/configs/grpo.py:NAME --workdir=DIR`.

Reads top to bottom: mesh → data → policy (from a pretraining run, or random) → shardings →
rollout/update steps → checkpoint → loop. Each step:

  1. take `prompts_per_step` training problems (a seeded permutation, so a resumed run sees the
     same ones), wrap each in the R1-Zero template, and draw G completions each with the
     KV-cached sampler at `rl.temperature`;
  2. score them (accuracy + format_weight·format), and compute group-relative advantages;
  3. compute the old log-probs once with a trainer forward pass (and the frozen reference
     model's when β > 0), then run μ = `rl.num_iterations` clipped policy updates on the batch.

Departures from the papers (DeepSeekMath, R1), each a config choice:
  - the answer reward needs the completion's LAST <answer> block; the format reward needs
    exactly one think and one answer block; `format_weight` is R1's 1 in `v3-671b` and
    TinyZero's 0.1 in the small runs (`rl.format_weight`, names in `rl.rewards.FORMAT_WEIGHTS`);
  - the reference model is the starting policy and is never reset (R1-Zero resets every 400
    steps; not needed for runs this short); β defaults to 0 for the CPU demo (no reference
    forward), 0.04 in `tiny` to exercise it;
  - the `compact` template (question + " <think>") for small models instead of the full R1-Zero
    text, which costs ~300 prompt tokens per sample;
  - the CPU demo (`small`) samples at temperature 0.7, not 1: at 1 its small model's sampled
    exact answers are wrong so often that working a problem out earns no more reward than
    estimating it (BENCHMARKS.md);
  - advantages use the population std (the paper does not say), and the loss averages tokens
    per completion, then completions (the paper's form; `rl.aggregation` selects DAPO's or
    Dr. GRPO's instead).

Outputs under DIR as for pretraining: metrics.jsonl (with `reward_mean`), tensorboard/,
checkpoints/ (rerunning resumes). `config` is a run config from `deepseek_jax.configs.grpo`.
"""

from __future__ import annotations

import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import parallel
from deepseek_jax.data import r1, run_config
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import advantages as adv_lib
from deepseek_jax.rl import rollout
from deepseek_jax.rl.evaluate import evaluate
from deepseek_jax.rl.step import grpo_step, target_logprobs
from deepseek_jax.sampling import generate
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.metrics import MetricsWriter
from deepseek_jax.train.optimizer import make_optimizer, learning_rate_schedule
from deepseek_jax.train.step import NonFiniteLoss, TrainState, model_variables
from deepseek_jax.configs.pretrain import to_model_config
from deepseek_jax.train import sharded


def _problems(source, indices):
    return [r1.problem_from_record(source[int(i)]) for i in indices]


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) GRPO; returns {"before": eval metrics, "after": eval metrics, "last":
    the last logged training metrics}."""
    rl = config.rl
    # Absolute from here on (Orbax needs it); created and checked before the data is prepared.
    workdir = run_dir.prepare(workdir)
    pretrained = run_dir.resolve(config.init.pretrain_dir)
    if pretrained == workdir:
        raise ValueError(f"init.pretrain_dir and the workdir are both {workdir}: GRPO writes "
                         "its own checkpoints, so give it another --workdir")
    if rl.group_size < 2:
        raise ValueError("rl.group_size must be >= 2: group-relative advantages of a single "
                         "completion are always 0")
    # --- mesh ---------------------------------------------------------------------------------
    parallel.maybe_initialize_distributed(config.mesh.distributed)
    devices = jax.devices()[: config.mesh.num_devices or None]
    if config.mesh.num_devices and (jax.process_count() > 1 or
                                    config.mesh.num_devices > jax.device_count()):
        raise ValueError(f"mesh.num_devices={config.mesh.num_devices}: use 0 (all devices) in "
                         f"multi-process runs, or at most the {jax.device_count()} devices here")
    mesh = parallel.make_mesh(parallel.run_mesh_config(config.mesh, len(devices)), devices)
    rules = parallel.logical_axis_rules(config.mesh.preset, mesh)
    batch_rows = rl.prompts_per_step * rl.group_size
    is_lead = jax.process_index() == 0

    # --- data ---------------------------------------------------------------------------------
    data_cfg = config.data
    # Prompts start with BOS; the byte tokenizer by default, else the model's tokenizer.json.
    encoder = Encoder(data_cfg.tokenizer or None, add_bos=True)
    data_dir = run_dir.resolve(data_cfg.data_dir) or os.path.join(workdir, "data")
    train_src = run_config.task_source(data_cfg, data_dir, "train")
    test_src = run_config.task_source(data_cfg, data_dir, "test")
    eval_problems = _problems(test_src, range(min(config.train.eval_problems, len(test_src))))
    order = np.random.default_rng(config.seed).permutation(len(train_src))
    max_prompt = max(len(p) for p in rollout.encode_prompts(
        _problems(train_src, order[: min(len(order), 2000)]) + eval_problems,
        data_cfg.template, encoder))
    row_len = max_prompt + 8 + rl.max_new_tokens       # slack for longer unseen prompts

    # --- policy -------------------------------------------------------------------------------
    # The model first, checked against the mesh and tokenizer before anything is read.
    model_config = (ckpt.load_model_config(pretrained) if pretrained
                    else to_model_config(config.model))
    sharded.validate(model_config, mesh, rules, batch_rows)
    if model_config.vocab_size < encoder.vocab_size:
        raise ValueError(f"the model's vocab_size {model_config.vocab_size} is smaller than the "
                         f"tokenizer's {encoder.vocab_size}: set data.tokenizer to the model's "
                         "tokenizer.json (an HF-imported model needs its own)")
    run_dir.check_same_model(workdir, model_config)
    if pretrained:
        # Read straight into the run's shardings: a large model never lands whole on a device.
        _, variables = ckpt.load_trained(
            pretrained, shardings=sharded.param_shardings(model_config, mesh, rules))
    else:
        from deepseek_jax.model import init_variables
        import flax
        variables = flax.core.meta.unbox(init_variables(jax.random.key(config.seed),
                                                        model_config))
    if is_lead:
        ckpt.save_model_config(workdir, model_config)
    schedule = learning_rate_schedule(config.optim.lr, config.optim.warmup_steps,
                                      config.train.steps, kind="constant")
    tx = make_optimizer(schedule, b1=config.optim.b1, b2=config.optim.b2,
                        weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm)
    shardings = sharded.state_shardings(model_config, mesh, rules, tx)
    place = lambda tree, s: jax.tree.map(jax.device_put, tree, s)
    params = place(variables["params"], shardings.params)
    routing = place(variables.get("routing", {}), shardings.routing)
    # A copy, frozen: the update donates the policy buffers.
    reference = jax.tree.map(jnp.copy, params) if rl.beta else None
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                       routing=routing)

    # --- steps --------------------------------------------------------------------------------
    batch_sharding = parallel.batch_sharding(mesh, rules)
    rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*batch_sharding.spec[:1]))
    with parallel.sharding_context(mesh, rules):
        update = jax.jit(functools.partial(
            grpo_step, config=model_config, tx=tx, temperature=rl.temperature,
            eps_low=rl.eps_low, eps_high=rl.eps_high, beta=rl.beta,
            aggregation=rl.aggregation, max_len=rl.max_new_tokens,
            bias_update_rate=rl.bias_update_rate),
            in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
        logprobs_fn = jax.jit(lambda p, r, t: target_logprobs(p, r, t, model_config,
                                                              rl.temperature)[0])

    def variables_of(state):
        return model_variables(state.params, state.routing)

    def sample(state, prompts, rng, temperature):
        return generate(variables_of(state), model_config, prompts,
                        max_new_tokens=rl.max_new_tokens, temperature=temperature,
                        eos_id=encoder.eos_id, rng=rng, mesh=mesh, rules=rules)

    def run_eval(state) -> dict:
        return evaluate(variables_of(state), model_config, eval_problems, data_cfg.template,
                        max_new_tokens=rl.max_new_tokens, batch_size=batch_rows,
                        mesh=mesh, rules=rules, encoder=encoder,
                        show=config.train.samples_to_show)

    # --- checkpoint ---------------------------------------------------------------------------
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"),
                                save_every=config.train.checkpoint_every,
                                keep=config.train.keep_checkpoints)
    rng = jax.random.key(config.seed)
    start = 0
    if manager.latest_step() is not None:
        state, rng, data_state = ckpt.restore(manager, ckpt.abstract_like(state, shardings))
        start = int(state.step) // rl.num_iterations
        before = data_state.get("before", {})
        if is_lead:
            print(f"resumed from GRPO step {start}", flush=True)
    else:
        before = run_eval(state) if config.train.eval_every else {}
        if is_lead and before:
            print(f"held-out accuracy before GRPO: {before['accuracy']:.3f} "
                  f"(format {before['format']:.3f})", flush=True)

    # --- loop ---------------------------------------------------------------------------------
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda s, f: stop.__setitem__("signal", s))
    writer = MetricsWriter(workdir, config.train.steps)
    if start and is_lead:
        from deepseek_jax.train.metrics import truncate_after
        truncate_after(os.path.join(workdir, "metrics.jsonl"), start)
    last, after = {}, {}
    try:
        for step in range(start, config.train.steps):
            # 1. prompts and completions
            idx = order[np.arange(step * rl.prompts_per_step, (step + 1) * rl.prompts_per_step)
                        % len(order)]
            problems = [p for p in _problems(train_src, idx) for _ in range(rl.group_size)]
            prompts = rollout.encode_prompts(problems, data_cfg.template, encoder)
            out = sample(state, prompts, jax.random.fold_in(rng, step), rl.temperature)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            completions = rollout.completion_ids(tokens, lengths)
            # 2. rewards and advantages
            scores = rollout.score_completions(completions, problems, rl.format_weight, encoder,
                                               template=data_cfg.template)
            advantages = adv_lib.group_advantages(scores["total"], rl.group_size,
                                                  rl.advantage_scale)
            # 3. old (and reference) log-probs once, then μ updates
            rows = rollout.training_rows(prompts, completions, row_len, np.asarray(out.logprobs),
                                         pad_id=encoder.pad_id)
            batch = {"tokens": jax.device_put(rows["tokens"], batch_sharding),
                     "mask": jax.device_put(rows["mask"], batch_sharding),
                     "token_mask": jax.device_put(rows["token_mask"], batch_sharding),
                     "advantages": jax.device_put(advantages, rows_sharding)}
            batch["old_logp"] = logprobs_fn(state.params, state.routing, batch["tokens"])
            if rl.beta:
                batch["ref_logp"] = logprobs_fn(reference, state.routing, batch["tokens"])
            for _ in range(rl.num_iterations):
                state, m = update(state, batch)
            m = jax.device_get(m)
            if not bool(m.pop("finite")):
                raise NonFiniteLoss(f"GRPO step {step + 1}: non-finite loss or gradient; "
                                    "lower optim.lr and rerun to resume")
            done = step + 1
            if done % config.train.log_every == 0 or done == config.train.steps:
                mask = rows["mask"]
                old = np.asarray(batch["old_logp"])
                gap = np.abs(rows["sampler_logp"] - old)[mask > 0]
                truncated = np.mean([lengths[i] == rl.max_new_tokens and
                                     (not completions[i] or completions[i][-1] != encoder.eos_id)
                                     for i in range(len(completions))])
                last = {**{k: float(v) for k, v in m.items()},
                        "reward_mean": float(scores["total"].mean()),
                        "reward_std": float(scores["total"].std()),
                        "accuracy_reward_mean": float(scores["accuracy"].mean()),
                        "format_reward_mean": float(scores["format"].mean()),
                        "accuracy_reward_std": float(scores["accuracy"].std()),
                        "format_reward_std": float(scores["format"].std()),
                        "zero_variance_groups": float(adv_lib.zero_variance_fraction(
                            scores["total"], rl.group_size)),
                        "completion_length": float(lengths.mean()),
                        "truncation_rate": float(truncated),
                        "sampler_trainer_logp_gap": float(gap.max()) if gap.size else 0.0}
                writer.write(done, last)
                if is_lead:
                    for text in scores["texts"][: config.train.samples_to_show]:
                        print(f"    sample: {text!r}", flush=True)
            if config.train.eval_every and done % config.train.eval_every == 0:
                after = run_eval(state)
                writer.write(done, {k: after[k] for k in ("accuracy", "format")},
                             prefix="eval_")
            stopping = stop["signal"] is not None or manager.reached_preemption(done)
            if done % config.train.checkpoint_every == 0 or stopping or done == config.train.steps:
                ckpt.save(manager, done * rl.num_iterations, state, rng,
                          {"step": done, "before": before}, force=True)
            if stopping:
                manager.wait_until_finished()
                if is_lead:
                    print(f"stopped by signal at GRPO step {done}; checkpoint saved", flush=True)
                return {"before": before, "after": after, "last": last}
        manager.wait_until_finished()
        if config.train.eval_every and not after:
            after = run_eval(state)
        if is_lead and before and after:
            print(f"held-out accuracy: before GRPO {before['accuracy']:.3f} → after "
                  f"{after['accuracy']:.3f}", flush=True)
        return {"before": before, "after": after, "last": last}
    finally:
        signal.signal(signal.SIGTERM, previous)
        writer.close()
        manager.close()

