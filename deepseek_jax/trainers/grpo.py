"""GRPO with verifiable rewards, `train_and_evaluate(config, workdir)`; the command line is
`python -m experiments.grpo --config=experiments/configs/grpo.py:NAME --workdir=DIR`.

Reads top to bottom: mesh → problems → policy (from a pretraining run, or random) → compiled
steps → checkpoint → loop, over library functions in `deepseek_jax.rl` (problems, policy,
rollout) and the run scaffolding shared with pretraining (`train.run`). Each step:

  1. take `prompts_per_step` training problems (a seeded permutation, so a resumed run sees the
     same ones), wrap each in the R1-Zero template, and draw G completions each with the
     KV-cached sampler at `rl.temperature` (`rl.rollout`, `rl/rollout.py`: by default each
     prompt prefilled once and continuous batching);
  2. score them (accuracy + format_weight·format), and compute group-relative advantages;
  3. compute the old log-probs once with a trainer forward pass (and the frozen reference
     model's when β > 0), then run μ = `rl.num_iterations` clipped policy updates on the batch.

LoRA (`adapter.rank` > 0, `model/adapters.py`): the starting weights (merged, if that run had
adapters) stay frozen and the update trains adapters only; with β > 0 the reference log-probs
are the policy's with its adapters off, so no second copy of the weights is held.

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
checkpoints/ (rerunning resumes), goodput.json (rollouts count as step time). `config` is a run
config from `deepseek_jax.configs.grpo`.
"""

from __future__ import annotations


import jax

from deepseek_jax import parallel
from deepseek_jax.configs.pretrain import starting_model
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.model import adapters
from deepseek_jax.rl import advantages as adv_lib
from deepseek_jax.rl import policy, rollout
from deepseek_jax.rl.evaluate import evaluate
from deepseek_jax.rl.problems import load_problems
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import sharded
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.optimizer import make_optimizer, learning_rate_schedule
from deepseek_jax.train.run import Run, run_mesh, scheduled
from deepseek_jax.train.step import NonFiniteLoss, model_variables


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) GRPO; returns {"before": eval metrics, "after": eval metrics, "last":
    the last logged training metrics}."""
    rl = config.rl
    workdir, pretrained = _check(config, workdir)
    mesh, rules = run_mesh(config.mesh, config.mesh.num_devices, samples=True)
    batch_rows = rl.prompts_per_step * rl.group_size

    # --- problems: prompts start with BOS; the byte tokenizer by default, else tokenizer.json
    encoder = Encoder(config.data.tokenizer or None, add_bos=True)
    data_dir = run_dir.resolve(config.data.data_dir) or run_dir.default_data_dir(workdir)
    problems = load_problems(config.data, data_dir, seed=config.seed,
                             num_eval=config.train.eval_problems,
                             max_new_tokens=rl.max_new_tokens, encoder=encoder)

    # --- policy: the model checked against mesh, tokenizer and workdir before any read -------
    model_config = scheduled(starting_model(config, pretrained), mesh, config.mesh)
    policy.check_policy(model_config, mesh, rules, batch_rows, encoder, workdir)
    rollout.check_rollout(rl, model_config, mesh, rules)
    lr = learning_rate_schedule(config.optim.lr, config.optim.warmup_steps, config.train.steps,
                                kind="constant")
    tx = make_optimizer(lr, b1=config.optim.b1, b2=config.optim.b2,
                        weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm)
    shardings = sharded.state_shardings(model_config, mesh, rules, tx)
    lean = policy.lean_checkpoints(config, model_config, pretrained)
    state, reference = policy.initial_state(model_config, tx, shardings, pretrained,
                                            seed=config.seed, keep_reference=bool(rl.beta),
                                            step=policy.start_step(workdir, pretrained))
    if jax.process_index() == 0:
        ckpt.save_model_config(workdir, model_config)
    update, logprobs, reference_logprobs = policy.compile_steps(model_config, tx, shardings,
                                                                mesh, rules, rl)

    # The sampler runs the plain model: with LoRA adapters, on weights merged once per step.
    sampled_config, sampled_weights = policy.sampled_model(model_config, shardings)

    def sample(state, prompts, rng):
        return rollout.sample(model_variables(sampled_weights(state.params), state.routing),
                              sampled_config, prompts, rl, eos_id=encoder.eos_id, rng=rng,
                              mesh=mesh, rules=rules)

    def run_eval(state) -> dict:
        return evaluate(model_variables(sampled_weights(state.params), state.routing),
                        sampled_config,
                        problems.held_out, config.data.template,
                        max_new_tokens=rl.max_new_tokens, batch_size=batch_rows, mesh=mesh,
                        rules=rules, encoder=encoder, show=config.train.samples_to_show)

    with Run(workdir, config.train, unit="GRPO step") as run:
        # --- checkpoint: resume, or evaluate the starting policy ------------------------------
        rng, start, before = jax.random.key(config.seed), 0, {}
        if run.manager.latest_step() is not None:
            with run.timed("restore"):
                frozen = adapters.split(state.params, model_config)[1]    # LoRA: kept
                state, rng, data_state = policy.restore_state(run.manager, model_config, tx,
                                                              shardings, workdir, frozen)
            start, before = int(state.step) // rl.num_iterations, data_state.get("before", {})
            run.resumed(start)
        elif config.train.eval_every:
            with run.timed("eval"):
                before = run_eval(state)
            run.say(f"held-out accuracy before GRPO: {before['accuracy']:.3f} "
                    f"(format {before['format']:.3f})")

        # --- loop -----------------------------------------------------------------------------
        last, after = {}, {}
        for step in range(start, config.train.steps):
            run.profile(step + 1, state)             # train.profile_steps: trace this step?
            # 1. prompts and G completions each
            group = problems.for_step(step, rl.prompts_per_step, rl.group_size)
            prompts = rollout.encode_prompts(group, config.data.template, encoder)
            out = sample(state, prompts, jax.random.fold_in(rng, step))
            lengths = parallel.to_host(out.lengths)          # whole, on every process
            completions = rollout.completion_ids(parallel.to_host(out.tokens), lengths)
            # 2. rewards and advantages
            scores = rollout.score_completions(completions, group, rl.format_weight, encoder,
                                               template=config.data.template)
            advantages = adv_lib.group_advantages(scores["total"], rl.group_size,
                                                  rl.advantage_scale)
            # 3. old (and reference) log-probs once, then μ updates
            rows = rollout.training_rows(prompts, completions, problems.row_len,
                                         parallel.to_host(out.logprobs), pad_id=encoder.pad_id)
            batch = policy.to_device(rows, advantages, mesh, rules)
            batch["old_logp"] = logprobs(state.params, state.routing, batch["tokens"])
            if rl.beta:
                ref = state.params if reference is None else reference     # LoRA: adapters off
                batch["ref_logp"] = reference_logprobs(ref, state.routing, batch["tokens"])
            for _ in range(rl.num_iterations):
                state, m = update(state, batch)
            m = jax.device_get(m)
            if not bool(m.pop("finite")):
                raise NonFiniteLoss(f"GRPO step {step + 1}: non-finite loss or gradient; "
                                    "lower optim.lr and rerun to resume")
            done = step + 1
            if done % config.train.log_every == 0 or done == config.train.steps:
                last = {**{k: float(v) for k, v in m.items()},
                        **rollout.rollout_metrics(
                            scores, completions, lengths, rows, parallel.to_host(batch["old_logp"]),
                            group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
                            eos_id=encoder.eos_id)}
                run.writer.write(done, last)
                for text in scores["texts"][: config.train.samples_to_show]:
                    run.say(f"    sample: {text!r}")
            if config.train.eval_every and done % config.train.eval_every == 0:
                with run.timed("eval"):
                    after = run_eval(state)
                run.writer.write(done, {k: after[k] for k in ("accuracy", "format")},
                                 prefix="eval_")
            stopping = run.stopping(done)
            if run.checkpoint_due(done, stopping):
                with run.timed("checkpoint"):
                    ckpt.save(run.manager, done * rl.num_iterations,
                              policy.checkpointed(state, model_config, lean), rng,
                              {"step": done, "before": before}, force=True)
            if stopping:
                run.stop(done, {"before": before, "after": after, "last": last})
    if config.train.eval_every and not after:
        after = run_eval(state)
    if before and after:
        run.say(f"held-out accuracy: before GRPO {before['accuracy']:.3f} → after "
                f"{after['accuracy']:.3f}")
    return {"before": before, "after": after, "last": last}


def _check(config, workdir: str) -> tuple[str, str]:
    """(absolute workdir, created and checked; absolute pretraining run directory or "")."""
    workdir, pretrained = run_dir.prepare_with_start(workdir, config.init.pretrain_dir, "GRPO")
    if config.rl.group_size < 2:
        raise ValueError("rl.group_size must be >= 2: group-relative advantages of a single "
                         "completion are always 0")
    return workdir, pretrained
