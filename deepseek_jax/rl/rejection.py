"""Rejection sampling (R1's stage 3): K completions per problem from a policy, the ones the
verifiable rewards accept kept as SFT data.

  rejection_sample(problems, sampler, out=OUT.jsonl, k=K, ...)
      for each batch of problems not done yet: K completions each (`sampler`), scored with
      `rewards.score` (accepted: the completion ended with eos, not at the token limit, its
      accuracy is 1, and its think/answer block is well-formed unless `require_format=False`),
      reduced per problem by `keep`, appended to OUT, then the batch's
      problems appended to OUT's progress file. Returns the totals.

  keep: "all" every accepted completion; "unique" accepted completions with distinct text (the
  first of each); "shortest" the shortest accepted one (R1 keeps readable, non-redundant
  samples; the shortest is the least rambling); "pairs" preference pairs for DPO instead: the
  i-th distinct accepted completion with the i-th distinct rejected one (finished, but wrong or
  ill-formed), as many as the shorter list holds, so a problem gives pairs only when the
  policy both solves and fails it.

Output (SFT-ready, read by `data/chat.py`): one JSON object a line,
  {"prompt": the templated prompt text, "completion": the completion text (without eos),
   "index": the problem's index, "problem": the problem's fields};
with keep="pairs" (DPO-ready, read by `data/preference.py`) "chosen" and "rejected" replace
"completion".
With the byte tokenizer's built-in chat template a record renders back to exactly bos + prompt
+ completion + eos, the text the policy produced.

Resuming: OUT.progress.jsonl gets one line per finished batch ({"problems": [indices], ...})
after the batch's samples are in OUT. A rerun reads it, drops from OUT any record of a problem
not listed (a batch cut short between the two writes), and samples only the problems not
listed. Each completion's randomness is keyed by (problem index, sample number), never by
batch, so a resumed run writes what an uninterrupted one would.

Left out: a readability filter beyond the format reward (R1 also drops mixed-language and
over-long chains of thought) and generative reward models for non-verifiable tasks.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from deepseek_jax.data import jsonl, r1
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import math_problems, rewards
from deepseek_jax.rl.evaluate import prompt_text

KEEP = ("all", "unique", "shortest", "pairs")

# sampler(prompts [B] id lists, keys [B] of (problem index, sample number)) → completion ids
Sampler = Callable[[list[list[int]], list[tuple[int, int]]], list[list[int]]]


def load_problem_file(path: str) -> list[dict[str, Any]]:
    """Problems from JSONL: task problems, arithmetic ({"prompt": "43+27=", "answer": "70",
    "op": "+"}) or countdown ({"numbers": [...], "target": N}), or math problems in GSM8K or
    MATH form (`math_problems`, checked by math-verify); a line missing a field is an error
    naming it."""
    out = []
    for where, number, record in jsonl.records(path):
        if isinstance(record, dict) and ({"question", "problem"} & set(record)):
            out.append(math_problems.parse_problem(record, where, f"line {number}"))
            continue
        need = ("prompt", "answer", "op") if "op" in record else ("numbers", "target")
        missing = [k for k in need if k not in record]
        if missing:
            raise ValueError(f"{where}: missing {missing}; an arithmetic problem needs "
                             "prompt, answer and op, a countdown one numbers and target, a "
                             f"math problem {math_problems.EXPECTED}")
        out.append(record)
    if not out:
        raise ValueError(f"{path}: no problems")
    return out


def select(texts: Sequence[str], keep: str) -> list[str]:
    """The accepted completions of one problem that are kept, in sampling order."""
    if keep == "all":
        return list(texts)
    if keep == "unique":
        return list(dict.fromkeys(texts))
    if keep == "shortest":
        return [min(texts, key=len)] if texts else []
    if keep == "pairs":                    # pairs are formed by the caller from unique texts
        return list(dict.fromkeys(texts))
    raise ValueError(f"keep={keep!r}; use one of {KEEP}")


def accepted(text: str, problem: dict[str, Any], template: str, require_format: bool) -> bool:
    scored = rewards.score(text, problem, template=template)
    return scored["accuracy"] == 1.0 and (scored["format"] == 1.0 or not require_format)


def progress_path(out: str) -> str:
    return out + ".progress.jsonl"


def _done(out: str) -> set[int]:
    """Problems finished by earlier runs; OUT cut back to their records."""
    done = set()
    if os.path.exists(progress_path(out)):
        with open(progress_path(out)) as f:
            for line in f:
                if line.strip():
                    done.update(json.loads(line)["problems"])
    if os.path.exists(out):
        with open(out) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line)["index"] in done]
        if len(kept) != len(lines):
            with open(out + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(out + ".tmp", out)
    return done


def _append(path: str, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def rejection_sample(problems: Sequence[dict[str, Any]], sampler: Sampler, *, out: str, k: int,
                     template: str, encoder: Encoder, batch_prompts: int, keep: str = "all",
                     require_format: bool = True, report: Callable[[str], None] = print) -> dict:
    """Samples, filters and appends (module docstring); returns {"problems", "sampled",
    "accepted", "kept", "problems_with_sample"} over the whole file, earlier runs included."""
    select([], keep)                                          # a bad `keep` fails first
    if k < 1 or batch_prompts < 1:
        raise ValueError(f"k={k}, batch_prompts={batch_prompts}: both must be at least 1")
    done = _done(out)
    todo = [i for i in range(len(problems)) if i not in done]
    report(f"rejection sampling: {len(done)} of {len(problems)} problems done, "
           f"{len(todo)} to go, K={k}")
    for start in range(0, len(todo), batch_prompts):
        indices = todo[start: start + batch_prompts]
        padded = indices + [indices[-1]] * (batch_prompts - len(indices))   # one shape
        keys = [(i, j) for i in padded for j in range(k)]
        prompts = [encoder.encode_prompt(prompt_text(problems[i], template)) for i, _ in keys]
        completions = sampler(prompts, keys)
        texts = [encoder.decode(c) for c in completions]
        finished = [bool(c) and c[-1] == encoder.eos_id for c in completions]
        rows, accepted_count = [], 0
        for n, i in enumerate(indices):
            good, bad = [], []
            for t, done_ in zip(texts[n * k:(n + 1) * k], finished[n * k:(n + 1) * k]):
                if done_:
                    (good if accepted(t, problems[i], template, require_format) else bad).append(t)
            accepted_count += len(good)
            head = {"prompt": prompt_text(problems[i], template)}
            tail = {"index": i, "problem": problems[i]}
            if keep == "pairs":
                rows += [{**head, "chosen": c, "rejected": r, **tail}
                         for c, r in zip(select(good, "unique"), select(bad, "unique"))]
            else:
                rows += [{**head, "completion": t, **tail} for t in select(good, keep)]
        _append(out, rows)
        _append(progress_path(out), [{"problems": indices, "sampled": len(indices) * k,
                                      "accepted": accepted_count, "kept": len(rows)}])
        report(f"  {start + len(indices)}/{len(todo)} problems: {accepted_count} of "
               f"{len(indices) * k} accepted, {len(rows)} kept")
    return summary(out)


def summary(out: str) -> dict:
    """Totals over OUT's progress file and records."""
    batches = ([json.loads(line) for line in open(progress_path(out)) if line.strip()]
               if os.path.exists(progress_path(out)) else [])
    records = [json.loads(line) for line in open(out) if line.strip()] if os.path.exists(
        out) else []
    return {"problems": sum(len(b["problems"]) for b in batches),
            "sampled": sum(b["sampled"] for b in batches),
            "accepted": sum(b["accepted"] for b in batches),
            "kept": len(records),
            "problems_with_sample": len({r["index"] for r in records})}


def policy_sampler(variables, config, *, max_new_tokens: int, temperature: float, eos_id: int,
                   seed: int, mesh=None, rules=None) -> Sampler:
    """A `Sampler` over `sampling.generate`: row (i, j) draws with the key
    fold_in(fold_in(key(seed), i), j), so its completion depends on nothing else."""
    import jax
    import numpy as np

    from deepseek_jax import parallel
    from deepseek_jax.sampling import generate
    root = jax.random.key(seed)

    def sample(prompts, keys):
        rngs = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(root, i), j))(
            *(np.asarray(x, np.uint32) for x in zip(*keys)))
        out = generate(variables, config, prompts, max_new_tokens=max_new_tokens,
                       temperature=temperature, eos_id=eos_id, rng=rngs, mesh=mesh,
                       rules=rules)
        tokens, lengths = parallel.to_host(out.tokens), parallel.to_host(out.lengths)
        return [tokens[b, : int(lengths[b])].tolist() for b in range(len(prompts))]
    return sample


def from_run(run: str, config, *, out: str, k: int, problems_file: str = "",
             split: str = "train", num_problems: int = 0, batch_prompts: int = 16,
             keep: str = "all", require_format: bool = True, seed: int = 0) -> dict:
    """`rejection_sample` from the latest checkpoint of the run at `run`, on the problems of
    `problems_file`, or else of the GRPO run config `config`'s task (`split`, the first
    `num_problems`; 0 = all), with its template, temperature, max_new_tokens, tokenizer and
    mesh. Everything is checked before the checkpoint is read."""
    from deepseek_jax.model import adapters
    from deepseek_jax.data import run_config
    from deepseek_jax.train import checkpoint as ckpt
    from deepseek_jax.train import sharded
    from deepseek_jax.train import workdir as run_dir
    from deepseek_jax.train.run import run_mesh, scheduled
    select([], keep)
    encoder = Encoder(config.data.tokenizer or None, add_bos=True)
    if problems_file:
        problems = load_problem_file(problems_file)
    else:
        data_dir = run_dir.resolve(config.data.data_dir) or run_dir.default_data_dir(run)
        source = run_config.task_source(config.data, data_dir, split)
        count = min(num_problems or len(source), len(source))
        problems = [r1.problem_from_record(source[i]) for i in range(count)]
    problems = problems[: num_problems or None]
    mesh, rules = run_mesh(config.mesh, config.mesh.num_devices, samples=True)
    model_config = scheduled(adapters.plain(ckpt.load_model_config(run)), mesh,
                             config.mesh)                 # trained with adapters: merged
    sharded.validate(model_config, mesh, rules, batch_prompts * k)
    if model_config.vocab_size < encoder.vocab_size:
        raise ValueError(f"the model's vocab_size {model_config.vocab_size} is smaller than the "
                         f"tokenizer's {encoder.vocab_size}: set data.tokenizer to its tokenizer")
    _, variables = ckpt.load_trained(run, shardings=sharded.param_shardings(model_config, mesh,
                                                                            rules), merged=True)
    sampler = policy_sampler(variables, model_config, max_new_tokens=config.rl.max_new_tokens,
                             temperature=config.rl.temperature, eos_id=encoder.eos_id,
                             seed=seed, mesh=mesh, rules=rules)
    return rejection_sample(problems, sampler, out=out, k=k, template=config.data.template,
                            encoder=encoder, batch_prompts=batch_prompts, keep=keep,
                            require_format=require_format)
