"""Pretraining run configs: `--config=experiments/configs/pretrain.py:NAME`, NAME one of

  tiny     tests, seconds on one CPU:
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny --workdir=/tmp/tiny
  small    the CPU demo, minutes on two cores (the built-in arithmetic data):
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:small --workdir=/tmp/small
  v2-lite  DeepSeek-V2-Lite shapes on a pod slice, FSDP + EP (bring your text, on local disk of
           every host: --config.data.text_glob='/data/corpus/*.jsonl'
           --config.data.tokenizer=/data/tokenizer.json):
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:v2-lite --workdir=/mnt/shared/runs/v2lite
  v3-671b  DeepSeek-V3 on a large pod (e.g. v5p-1024), FSDP + EP, remat, bf16 compute:
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:v3-671b --workdir=/mnt/shared/runs/v3

Every field can be overridden: `--config.optim.lr=1e-3 --config.mesh.preset=fsdp_tp
--config.mesh.tensor=4 --config.model.remat_policy=full`. The config is locked: a misspelled
field is an error. `model` holds every ModelConfig field (dtype names as strings).
WORKDIR must be a filesystem every host sees (a shared mount on pods): metrics.jsonl is appended
to with plain file I/O.
"""

from __future__ import annotations


import jax.numpy as jnp
import ml_collections

from deepseek_jax.config import ModelConfig, get_config as get_model_config


def model_fields(config: ModelConfig) -> ml_collections.ConfigDict:
    """A ModelConfig as a ConfigDict of plain values (dtypes by name)."""
    return ml_collections.ConfigDict(config.to_dict())


def to_model_config(fields) -> ModelConfig:
    """The inverse of `model_fields`."""
    return ModelConfig.from_dict(fields)


_RUNS = {
    #        model      batch seq steps  lr     warmup preset      remat
    "tiny": ("tiny", 8, 32, 20, 3e-3, 2, "dp", "none"),
    "small": ("small", 16, 128, 1200, 3e-3, 10, "dp", "none"),
    "v2-lite": ("v2-lite", 1024, 4096, 100_000, 4.2e-4, 2000, "fsdp_ep", "full"),
    "v3-671b": ("v3-671b", 4096, 4096, 500_000, 2.2e-4, 2000, "fsdp_ep", "full"),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    if arg not in _RUNS:
        raise ValueError(f"unknown run config {arg!r}; use one of {sorted(_RUNS)}")
    model, batch, seq, steps, lr, warmup, preset, remat = _RUNS[arg]
    small = arg in ("tiny", "small")
    c = ml_collections.ConfigDict()
    c.name = arg
    c.seed = 0
    # The tiny model's 64-id vocabulary is too small for the byte tokenizer's 259 ids.
    overrides = {"vocab_size": 320} if arg == "tiny" else {}
    if small:
        # Runs of tens of steps: a faster bias update than V3's γ = 0.001 (tuned for 1e5 steps)
        # lets the aux-loss-free balancing visibly act.
        overrides["bias_update_rate"] = 0.01
        # On a CPU the dense dispatch (every expert on every token) is ~1.3× faster than the
        # grouped GEMM at these sizes; the math is the same.
        overrides["moe_impl"] = "dense"
    if arg == "small":
        # Four layers unrolled rather than scanned: on two CPU cores the step compiled in about
        # half the time and took ~15 % less CPU time (the scan's stacking of per-layer
        # activations for the backward pass is a copy per layer; BENCHMARKS.md).
        overrides["scan_layers"] = False
    else:
        overrides["dtype"] = jnp.bfloat16
    c.model = model_fields(get_model_config(model, remat_policy=remat, **overrides))

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "arithmetic" if small else "text_files"   # arithmetic, countdown, text_files
    c.data.data_dir = ""            # where the array_record files live; "" = WORKDIR/data
    c.data.num_train = 2000 if arg == "tiny" else 8000           # procedural tasks only
    c.data.num_eval = 200
    # "text", or an R1 template ("compact", "r1_zero"): prompt + <think>…</think><answer>…</answer>
    c.data.format = "compact" if arg == "small" else "text"
    # R1 formats only: shares of the problems written as bare lines ("43+27=70"), and worked out
    # column by column in the think block (see deepseek_jax/data/run_config.py).
    # small: ¾ bare lines (~6× more problems per token) is what made 700–1,200 steps learn some
    # arithmetic (10–20 % held-out; BENCHMARKS.md).
    c.data.plain_fraction = 0.75 if arg == "small" else 0.0
    c.data.worked_fraction = 0.0
    # R1 formats only: share of the R1-format problems written as a rough estimate (operands
    # rounded to tens; usually a wrong answer) instead of exact work: a careless habit next to
    # the exact one, for GRPO to select against (small: the demo, experiments/demo.py).
    c.data.estimate_fraction = 0.6 if arg == "small" else 0.0
    c.data.max_digits = 2 if arg == "small" else 3   # arithmetic: operand digits, at most ...
    c.data.min_digits = 2 if arg == "small" else 1   # ... and at least
    c.data.ops = "+-" if arg == "small" else "+-*"   # arithmetic: operators
    c.data.text_glob = ""           # text_files: files or a glob (.txt, .jsonl)
    c.data.text_field = "text"      # text_files: the JSONL field holding the text
    c.data.validation_fraction = 0.01  # text_files: share of documents held out for evaluation
    c.data.tokenizer = ""           # "" = the byte tokenizer; or a tokenizer.json path
    c.data.seq_len = seq
    c.data.global_batch = batch
    c.data.shuffle_seed = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.preset = preset          # dp, fsdp, fsdp_tp, fsdp_ep, dp_ep_tp
    # Axis sizes; all 0 = the preset's default shape for the devices found. -1 = the rest.
    c.mesh.dcn_data = 0
    c.mesh.data = 0
    c.mesh.fsdp = 0
    c.mesh.expert = 0
    c.mesh.tensor = 0
    c.mesh.distributed = ml_collections.FieldReference(None, field_type=bool)  # None = detect

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = lr
    c.optim.warmup_steps = warmup
    c.optim.schedule = "cosine"     # cosine, step (DeepSeek: ×0.316 at 80% and 90%), constant
    c.optim.final_fraction = 0.1
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95

    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.microbatches = 1        # gradient accumulation
    c.train.log_every = 1 if arg == "tiny" else 10
    c.train.eval_every = 10 if arg == "tiny" else 100
    c.train.eval_batches = 2 if small else 20
    c.train.checkpoint_every = 5 if arg == "tiny" else 100
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    return c
