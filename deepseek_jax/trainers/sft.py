"""Supervised fine-tuning on conversations, `train_and_evaluate(config, workdir)`; the command
line is `python -m experiments.sft --config=experiments/configs/sft.py:NAME --workdir=DIR`.

Reads top to bottom: mesh → data (conversations rendered by the chat template, the assistant
tokens masked, packed: `data/chat.py`, `data/sft.py`) → model (from `init.pretrain_dir`, a
pretraining/GRPO run or a converted HF checkpoint, or a random init) → the pretraining train
step, shardings and optimizer → checkpoint → loop. The step is `train.step.train_step`
unchanged: the assistant mask rides in the batch's `valid`, the loss weight of each target, so
the loss (LM + λ·MTP + α·balance) is a mean over assistant tokens only.

With `adapter.rank` > 0 the starting weights stay frozen and only LoRA adapters train
(`model/adapters.py`; the step is the same function, which differentiates the adapters alone).

Each `train.eval_every` steps (and before the first) the held-out assistant-token loss is logged
as `eval_lm_loss` (and `eval_mtp_loss`): the exact token mean over every held-out row, not a mean
of batch means. Outputs under DIR as for pretraining: metrics.jsonl, tensorboard/,
checkpoints/, model_config.json; rerunning resumes from the latest checkpoint with the same
batches (the batch of step s is a function of the seed and s).

Left out: the loss on prompt tokens (some recipes add a small weight; here it is 0), epochs
reshuffled across process counts (a resumed run must keep data.global_batch).
"""

from __future__ import annotations

import math

import jax

from deepseek_jax.configs.pretrain import starting_model
from deepseek_jax.data import sft as sft_data
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import policy
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import schedules
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.run import Run, run_mesh, scheduled, train_steps
from deepseek_jax.train.step import NonFiniteLoss


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) the SFT run; returns {"before", "after": held-out losses, "last": the
    last logged training metrics}."""
    config = config.copy_and_resolve_references()     # train.steps is filled in below
    workdir, pretrained = run_dir.prepare_with_start(workdir, config.init.pretrain_dir, "SFT")
    mesh, rules = run_mesh(config.mesh, config.mesh.num_devices)

    # --- data: every conversation checked and tokenized before the model is read ------------
    encoder = Encoder(config.data.tokenizer or None)
    train_rows, held_rows = sft_data.rows_from_config(config.data, encoder)
    if not config.train.steps:
        config.train.steps = config.train.epochs * math.ceil(len(train_rows) /
                                                             config.data.global_batch)
    p, n = jax.process_index(), jax.process_count()
    batches = sft_data.SFTBatches(train_rows, config.data.global_batch, config.data.shuffle_seed,
                                  p, n)
    held = sft_data.eval_batches(held_rows, config.data.global_batch, p, n)

    # --- model, optimizer, sharded steps ------------------------------------------------------
    model_config = scheduled(starting_model(config, pretrained), mesh, config.mesh)
    _check_model(config, model_config, mesh, rules, encoder, workdir)
    base_step = policy.start_step(workdir, pretrained)    # the starting run's step read
    lean = policy.lean_checkpoints(config, model_config, pretrained)
    plan = schedules.from_run_config(config)
    tx, step_fn, eval_fn, batch_sharding = train_steps(config, model_config, plan, mesh, rules)
    to_device = lambda b: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                           for k, v in b.items()}

    def held_out_loss(state) -> dict:
        """Token means over all held-out rows (each batch's means weighted by its targets)."""
        sums, count = {}, 0
        for b in held:
            m, k = jax.device_get(eval_fn(state, to_device(b))), sft_data.trained_tokens(b)
            for name in ("lm_loss", "mtp_loss"):
                sums[name] = sums.get(name, 0.0) + float(m[name]) * k
            count += k
        return {name: v / max(count, 1) for name, v in sums.items()}

    if p == 0:
        ckpt.save_model_config(workdir, model_config)
        print(f"SFT: {train_rows.samples} training samples in {len(train_rows)} rows of "
              f"{config.data.seq_len} ({train_rows.truncated} cut to fit), "
              f"{held_rows.samples} held out; {config.train.steps} steps", flush=True)

    with Run(workdir, config.train, async_save=config.train.async_checkpoint) as run:
        # --- checkpoint: restore, or start from the run at init.pretrain_dir ------------------
        resuming = run.manager.latest_step() is not None
        with run.timed("restore"):
            if resuming:
                state, rng, data_state = policy.restore_state(run.manager, model_config, tx,
                                                              step_fn.shardings, workdir)
                start, before = int(state.step), data_state.get("before", {})
                run.resumed(start)
            else:
                state, _ = policy.initial_state(model_config, tx, step_fn.shardings, pretrained,
                                                seed=config.seed, keep_reference=False,
                                                step=base_step)
                rng, start, before = jax.random.key(config.seed), 0, {}
        if not resuming and config.train.eval_every:
            with run.timed("eval"):
                before = held_out_loss(state)
                run.writer.write(0, before, prefix="eval_")

        # --- loop -----------------------------------------------------------------------------
        last, after = {}, {}
        for step in range(start, config.train.steps):
            with run.timed("data"):
                batch = to_device(batches.batch(step))
            state, m = step_fn(state, batch)
            m, done = jax.device_get(m), step + 1
            if not bool(m.pop("finite")):
                raise NonFiniteLoss(f"SFT step {done}: loss {float(m['loss'])}, grad norm "
                                    f"{float(m['grad_norm'])}; lower optim.lr and rerun to "
                                    "resume from the last good checkpoint")
            if done % config.train.log_every == 0 or done == config.train.steps:
                last = {**{k: float(v) for k, v in m.items()},
                        "lr": float(plan.learning_rate(step))}
                run.writer.write(done, last)
            if config.train.eval_every and (done % config.train.eval_every == 0
                                            or done == config.train.steps):
                with run.timed("eval"):
                    after = held_out_loss(state)
                run.writer.write(done, after, prefix="eval_")
            stopping = run.stopping(done)
            if run.checkpoint_due(done, stopping):
                with run.timed("checkpoint"):
                    ckpt.save(run.manager, done, policy.checkpointed(state, model_config, lean),
                              rng, {"step": done, "before": before}, force=True)
            if stopping:
                run.stop(done, {"before": before, "after": after, "last": last})
    return {"before": before, "after": after, "last": last}



def _check_model(config, model_config, mesh, rules, encoder: Encoder, workdir: str) -> None:
    """The model against the rows, the tokenizer, the mesh and the workdir, before any compile."""
    if config.data.seq_len > model_config.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len}; lower data.seq_len")
    policy.check_policy(model_config, mesh, rules, config.data.global_batch, encoder, workdir)
