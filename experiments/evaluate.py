"""Scores a trained checkpoint on math problems from the command line:

    python -m experiments.evaluate --run=DIR --problems=FILE.jsonl [--k=8 --num_samples=8 \
        --temperature=0.6 --top_p=0.95 --max_new_tokens=512 --batch_size=8 \
        --template=r1_zero --tokenizer=PATH --preset=dp --limit=0 --seed=0 --out=report.json]

DIR is a pretraining, GRPO or SFT run directory, or a converted HF checkpoint (its
model_config.json and latest checkpoint). FILE holds GSM8K- or MATH-style problems, one JSON
object a line (`deepseek_jax.rl.math_problems`). Each problem is put in the R1 `--template`
(`deepseek_jax.data.r1`; the run directory does not record the template it trained with, so say
it when it is not r1_zero) and encoded with the run's tokenizer: bytes by default, or the
`--tokenizer` tokenizer.json, as GRPO's `data.tokenizer`.

Two passes: greedy (one completion per problem: `greedy_accuracy`), then `--num_samples` n ≥ k
sampled completions per problem at `--temperature` and `--top_p` (R1's evaluation settings,
0.6 and 0.95, by default): `pass@k` by the unbiased estimator, and `sample_accuracy` (pass@1
estimated from the samples). `--k=0` skips the sampled pass. A completion's answer is its last
<answer> block or \\boxed{}, checked against the reference by math-verify
(`deepseek_jax.rl.math_answers`).

Writes a JSON report (`--out`, default DIR/eval/<problem file name>.json): the settings, the
summary, and per problem the question, reference, greedy completion, its answer and score, and
the sampled answers and how many were right. Prints a progress line per batch and the summary.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags, logging
from etils import epath

from deepseek_jax import parallel
from deepseek_jax.data import r1
from deepseek_jax.model import adapters
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import evaluate as ev
from deepseek_jax.rl.math_problems import read_problems
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import sharded
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.metrics import Clock


def _check(k: int, n: int, temperature: float, batch_size: int, template: str) -> None:
    """Flag errors, before anything is read or compiled."""
    r1.prefills_think(template)
    if k < 0 or (k and n < k):
        raise ValueError(f"--num_samples={n} must be at least --k={k} (pass@k needs n >= k)")
    if k and temperature <= 0:
        raise ValueError(f"--temperature={temperature}: pass@k needs sampling (> 0), or --k=0")
    if batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} must be at least 1")


def _check_lengths(problems, template: str, encoder: Encoder, max_new_tokens: int,
                   max_seq_len: int) -> None:
    """The longest prompt plus `max_new_tokens` must fit the model's positions: checked for
    every problem at once, before the weights are read."""
    lengths = [len(encoder.encode_prompt(ev.prompt_text(p, template))) for p in problems]
    i = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[i] + max_new_tokens > max_seq_len:
        raise ValueError(f"problem {problems[i]['id']}: its prompt ({lengths[i]} tokens) plus "
                         f"--max_new_tokens={max_new_tokens} exceeds the model's max_seq_len "
                         f"{max_seq_len}; lower --max_new_tokens or leave out long problems")


def _progress(label: str, console):
    """A callback printing "LABEL [###...] done/total H:MM:SS elapsed, ETA H:MM:SS"."""
    clock = Clock()
    return lambda done, total: print(f"{label} {clock.line(done, total)}", file=console,
                                     flush=True)


def _problem_report(problem: dict, greedy: list[dict], sampled: list[dict]) -> dict:
    g = greedy[0]
    out = {**problem, "greedy": {k: g[k] for k in ("text", "answer", "accuracy", "format",
                                                   "length")}}
    if sampled:
        out["sampled"] = {"answers": [s["answer"] for s in sampled],
                          "correct": sum(int(s["accuracy"] > 0) for s in sampled),
                          "n": len(sampled)}
    return out


def evaluate_run(run: str, problems_path: str, *, k: int = 8, num_samples: int = 0,
                 temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 512,
                 batch_size: int = 8, template: str = "r1_zero", tokenizer: str = "",
                 preset: str = "dp", limit: int = 0, seed: int = 0, out: str = "",
                 console=sys.stdout) -> dict:
    """Scores the run at `run` on the problems in `problems_path` (module docstring); returns
    the report it writes to `out`."""
    n = num_samples or k
    _check(k, n, temperature, batch_size, template)
    problems = read_problems(problems_path, limit)
    encoder = Encoder(tokenizer or None, add_bos=True)
    config = adapters.plain(ckpt.load_model_config(run))     # trained with adapters: merged
    if config.vocab_size < encoder.vocab_size:
        raise ValueError(f"{run} has vocab_size {config.vocab_size}, smaller than the "
                         f"tokenizer's {encoder.vocab_size}: pass the run's --tokenizer")
    _check_lengths(problems, template, encoder, max_new_tokens, config.max_seq_len)
    mesh, rules = parallel.mesh_and_rules(preset)
    _, variables = ckpt.load_trained(run, shardings=sharded.param_shardings(config, mesh, rules),
                                     merged=True)
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh, rules=rules,
                  encoder=encoder)
    greedy = ev.complete(variables, config, problems, template, progress=_progress(
        "greedy", console), **common)
    sampled = ev.complete(variables, config, problems, template, samples=n,
                          temperature=temperature, top_p=top_p if top_p < 1 else None,
                          rng=jax.random.key(seed), progress=_progress(f"{n} samples", console),
                          **common) if k else [[] for _ in problems]
    summary = ev.summarize(greedy, sampled if k else [], k)
    report = {"run": run, "problems_file": problems_path, "summary": summary,
              "settings": dict(k=k, num_samples=n if k else 0, temperature=temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, template=template,
                               tokenizer=tokenizer, seed=seed),
              "problems": [_problem_report(p, g, s) for p, g, s in zip(problems, greedy,
                                                                      sampled)]}
    out = out or str(epath.Path(run) / "eval" / (epath.Path(problems_path).stem + ".json"))
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(out).write_text(json.dumps(report, indent=1))
    print(" ".join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}"
                   for key, v in summary.items()) + f"\nreport: {out}", file=console, flush=True)
    return report


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    evaluate_run(run_dir.resolve(f.run, remote=True), run_dir.resolve(f.problems), k=f.k,
                 num_samples=f.num_samples, temperature=f.temperature, top_p=f.top_p,
                 max_new_tokens=f.max_new_tokens, batch_size=f.batch_size, template=f.template,
                 tokenizer=run_dir.resolve(f.tokenizer), preset=f.preset, limit=f.limit,
                 seed=f.seed, out=f.out and run_dir.resolve(f.out, remote=True))


if __name__ == "__main__":
    flags.DEFINE_string("run", None, "Run directory (model_config.json + checkpoints/).")
    flags.DEFINE_string("problems", None, "JSONL problems, GSM8K- or MATH-style.")
    flags.DEFINE_integer("k", 8, "pass@k's k; 0 = greedy only.")
    flags.DEFINE_integer("num_samples", 0, "Samples per problem, n >= k; 0 = k.")
    flags.DEFINE_float("temperature", 0.6, "Sampling temperature of the pass@k samples.")
    flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass of the samples; 1 = off.")
    flags.DEFINE_integer("max_new_tokens", 512, "Tokens generated per completion at most.")
    flags.DEFINE_integer("batch_size", 8, "Completions generated at once.")
    flags.DEFINE_string("template", "r1_zero", "R1 prompt template: r1_zero, r1_zero_think, "
                        "compact.")
    flags.DEFINE_string("tokenizer", "", "The run's tokenizer.json; empty = bytes.")
    flags.DEFINE_string("preset", "dp", "Parallelism preset of the evaluation mesh.")
    flags.DEFINE_integer("limit", 0, "Score only the first N problems; 0 = all.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampled completions.")
    flags.DEFINE_string("out", "", "Report path; empty = RUN/eval/<problems name>.json.")
    flags.mark_flags_as_required(["run", "problems"])
    app.run(main)
