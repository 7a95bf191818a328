"""Direct preference optimization on preference pairs, `train_and_evaluate(config, workdir)`;
the command line is `python -m experiments.dpo --config=experiments/configs/dpo.py:NAME
--workdir=DIR`.

Reads top to bottom: mesh → pairs (rendered by the chat template, the response tokens masked:
`data/preference.py`) → model (from `init.pretrain_dir`, or a random init) → optimizer, steps →
the reference log-probs → checkpoint → loop. The loss is `rl.dpo` (its docstring has the
formulas and options).

The reference model is the starting policy, frozen. Its log-probs of every training and
held-out pair are computed once, before the first step, with the same program that evaluates
the policy (so the held-out margins start at exactly 0), and saved in every checkpoint: a
resumed run reads them back instead of the starting weights, and the train step holds no second
copy of the model. With LoRA adapters (`adapter.rank` > 0) the reference is the policy with its
adapters off, and only the adapters train.

Each `train.eval_every` steps (and before the first) the held-out pair means are logged with the
prefix `eval_`: loss, preference_loss, nll_chosen, reward_accuracy (the share of pairs whose
chosen response gained more log-probability against the reference than the rejected one),
reward_margin, reward_chosen, reward_rejected, logp_chosen, logp_rejected. Outputs under DIR as
for SFT: metrics.jsonl, tensorboard/, checkpoints/, model_config.json, start.json; rerunning
resumes from the latest checkpoint with the same batches.

Left out: reference log-probs refreshed during the run, and pairs sampled online.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax import parallel
from deepseek_jax.configs.pretrain import starting_model
from deepseek_jax.data import preference
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.model import adapters
from deepseek_jax.rl import dpo, policy
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import sharded
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.optimizer import learning_rate_schedule, make_optimizer
from deepseek_jax.train.run import Run, run_mesh, scheduled
from deepseek_jax.train.step import NonFiniteLoss


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) the DPO run; returns {"before", "after": held-out pair means, "last":
    the last logged training metrics}."""
    config = config.copy_and_resolve_references()     # train.steps is filled in below
    settings = dpo.DPOSettings(**config.dpo.to_dict()).check()
    workdir, pretrained = run_dir.prepare_with_start(workdir, config.init.pretrain_dir, "DPO")
    mesh, rules = run_mesh(config.mesh, config.mesh.num_devices)

    # --- data: every pair checked and tokenized before the model is read ----------------------
    encoder = Encoder(config.data.tokenizer or None)
    train_rows, held_rows = preference.rows_from_config(config.data, encoder)
    B = config.data.global_batch
    if not config.train.steps:
        config.train.steps = config.train.epochs * math.ceil(len(train_rows) / B)
    batches = preference.pair_batches(train_rows, B, config.data.shuffle_seed)

    # --- model, optimizer, programs -----------------------------------------------------------
    model_config = scheduled(starting_model(config, pretrained), mesh, config.mesh)
    _check_model(config, model_config, mesh, rules, encoder, workdir)
    base_step = policy.start_step(workdir, pretrained)    # the starting run's step read
    lean = policy.lean_checkpoints(config, model_config, pretrained)
    lr = learning_rate_schedule(config.optim.lr, config.optim.warmup_steps, config.train.steps,
                                kind=config.optim.schedule,
                                final_fraction=config.optim.final_fraction)
    tx = make_optimizer(lr, b1=config.optim.b1, b2=config.optim.b2,
                        weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm)
    shardings = sharded.state_shardings(model_config, mesh, rules, tx)
    update, logprobs, reference, sums = _programs(config, model_config, settings, tx, shardings,
                                                  mesh, rules)
    place = _placement(mesh, rules)

    def reference_pass(state, rows) -> np.ndarray:
        """log π_ref [R, 2] of every row, in order."""
        out = [parallel.to_host(reference(state, place(b)))
               for b in preference.eval_batches(rows, B)]
        return np.concatenate(out)[: len(rows)] if out else np.zeros((0, 2), np.float32)

    def held_out(state) -> dict:
        """Pair means over every held-out pair (sums over batches, then one division)."""
        total = {}
        for b in preference.eval_batches(held_rows, B):
            b = place(b)
            s = jax.device_get(sums(logprobs(state, b), b["ref_logp"], b["mask"]))
            total = {k: total.get(k, 0.0) + float(v) for k, v in s.items()}
        n = max(total.pop("pairs", 0.0), 1.0)
        return {k: v / n for k, v in total.items()}

    if jax.process_index() == 0:
        ckpt.save_model_config(workdir, model_config)
        print(f"DPO: {len(train_rows)} training pairs ({train_rows.dropped} dropped, "
              f"{train_rows.truncated} sides cut to {config.data.seq_len} tokens), "
              f"{len(held_rows)} held out; {config.train.steps} steps", flush=True)

    with Run(workdir, config.train, async_save=config.train.async_checkpoint) as run:
        # --- checkpoint: restore (with the saved reference), or start and compute it --------
        resuming = run.manager.latest_step() is not None
        with run.timed("restore"):
            if resuming:
                state, rng, data_state = policy.restore_state(run.manager, model_config, tx,
                                                              shardings, workdir)
                start, before = int(state.step), data_state.get("before", {})
                saved = data_state["reference"]
                refs = {k: np.asarray(saved[k], np.float32).reshape(-1, 2) for k in saved}
                run.resumed(start)
            else:
                state, _ = policy.initial_state(model_config, tx, shardings, pretrained,
                                                seed=config.seed, keep_reference=False,
                                                step=base_step)
                rng, start, before = jax.random.key(config.seed), 0, {}
                refs = {"train": reference_pass(state, train_rows),
                        "held": reference_pass(state, held_rows)}
        _attach_reference(train_rows, held_rows, refs)
        saved_refs = {k: v.tolist() for k, v in refs.items()}
        if not resuming and config.train.eval_every:
            with run.timed("eval"):
                before = held_out(state)
                run.writer.write(0, before, prefix="eval_")

        # --- loop -----------------------------------------------------------------------------
        last, after = {}, {}
        for step in range(start, config.train.steps):
            with run.timed("data"):
                batch = place(batches.batch(step))
            state, m = update(state, batch)
            m, done = jax.device_get(m), step + 1
            if not bool(m.pop("finite")):
                raise NonFiniteLoss(f"DPO step {done}: loss {float(m['loss'])}, grad norm "
                                    f"{float(m['grad_norm'])}; lower optim.lr and rerun to "
                                    "resume from the last good checkpoint")
            if done % config.train.log_every == 0 or done == config.train.steps:
                last = {**{k: float(v) for k, v in m.items()}, "lr": float(lr(step))}
                run.writer.write(done, last)
            if config.train.eval_every and (done % config.train.eval_every == 0
                                            or done == config.train.steps):
                with run.timed("eval"):
                    after = held_out(state)
                run.writer.write(done, after, prefix="eval_")
            stopping = run.stopping(done)
            if run.checkpoint_due(done, stopping):
                with run.timed("checkpoint"):
                    ckpt.save(run.manager, done, policy.checkpointed(state, model_config, lean),
                              rng, {"step": done, "before": before, "reference": saved_refs},
                              force=True)
            if stopping:
                run.stop(done, {"before": before, "after": after, "last": last})
    return {"before": before, "after": after, "last": last}


def _programs(config, model_config, settings, tx, shardings, mesh, rules):
    """(update(state, batch) → (state, metrics), logprobs(state, batch) → [B, 2],
    reference(state, batch) → [B, 2], sums(logp, ref_logp, mask) → pair sums), each compiled
    under the run's mesh. `reference` is `logprobs` itself without adapters (called on the
    starting state), and the policy with its adapters off with them."""
    in_context = lambda fn, name: parallel.together(                 # noqa: E731
        parallel.InContext(fn, mesh, rules), name)
    update = in_context(jax.jit(functools.partial(
        dpo.dpo_step, config=model_config, tx=tx, settings=settings,
        microbatches=config.train.microbatches, bias_update_rate=config.train.bias_update_rate),
        in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0),
        "DPO update")
    logprobs = in_context(jax.jit(
        lambda s, b: dpo.pair_logprobs(s.params, s.routing, b, model_config)[0]), "log-probs")
    reference = logprobs
    if model_config.adapter_rank:
        reference = in_context(jax.jit(lambda s, b: dpo.pair_logprobs(
            adapters.disabled(s.params, model_config), s.routing, b, model_config)[0]),
            "reference log-probs")
    sums = jax.jit(functools.partial(dpo.weighted_sums, settings=settings))
    return update, logprobs, reference, sums


def _placement(mesh, rules):
    """batch (numpy, the same on every process) → arrays on the mesh: the pairs split like a
    training batch's rows, each side's positions like its length."""
    spec = parallel.batch_sharding(mesh, rules).spec
    rows, length = spec[0] if len(spec) else None, spec[1] if len(spec) > 1 else None
    by_position = NamedSharding(mesh, P(rows, None, length))               # [B, 2, T]
    by_pair = NamedSharding(mesh, P(rows, None))                           # [B, 2]
    return lambda batch: {k: parallel.to_global(v, by_pair if v.ndim == 2 else by_position)
                          for k, v in batch.items()}


def _attach_reference(train_rows, held_rows, refs: dict) -> None:
    """Puts the reference log-probs beside the rows (batches then carry them), after checking
    that a resumed run's saved ones still match its pairs."""
    for name, rows in (("train", train_rows), ("held", held_rows)):
        if len(refs[name]) != len(rows):
            raise ValueError(f"the checkpoint holds reference log-probs for {len(refs[name])} "
                             f"{name} pairs but the data now gives {len(rows)}: the pairs "
                             "changed since this run started; rerun with the original data, "
                             "or start a new --workdir")
        rows.arrays["ref_logp"] = refs[name]


def _check_model(config, model_config, mesh, rules, encoder: Encoder, workdir: str) -> None:
    """The model against the pairs, the tokenizer, the mesh and the workdir, before any
    compile."""
    if config.data.seq_len > model_config.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len}; lower data.seq_len")
    k, B = config.train.microbatches, config.data.global_batch
    if k < 1 or B % k:
        raise ValueError(f"data.global_batch={B} pairs is not divisible by "
                         f"train.microbatches={k}")
    policy.check_policy(model_config, mesh, rules, B // k, encoder, workdir)
