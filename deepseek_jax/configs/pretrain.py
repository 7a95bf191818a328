"""Pretraining run configs: `--config=experiments/configs/pretrain.py:NAME`, NAME one of

  tiny     tests, seconds on one CPU:
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny --workdir=/tmp/tiny
  small    the CPU demo, minutes on two cores (the built-in arithmetic data):
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:small --workdir=/tmp/small
  v2-lite  DeepSeek-V2-Lite shapes on a pod slice, FSDP + EP (bring your text, on local disk of
           every host: --config.data.text_glob='/data/corpus/*.jsonl'
           --config.data.tokenizer=/data/tokenizer.json):
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:v2-lite --workdir=/mnt/shared/runs/v2lite
  v3-671b  DeepSeek-V3 on a large pod (e.g. v5p-1024), FSDP + EP, remat, bf16 compute, with V3's
           recipe (§4.2) as fractions of the run: 14.8T tokens of 4K sequences, the batch
           ramped from 3072 to 15360 sequences over the first 469B tokens (micro-batches of 768
           accumulated, 4 → 20 per step, one compiled step), lr 2K warm-up steps to 2.2e-4,
           constant until 10T tokens, cosine to 2.2e-5 by 14.3T, 2.2e-5 for 333B and 7.3e-6 for
           the last 167B; MTP weight 0.3 then 0.1 from 10T; bias update speed 0.001 then 0 for
           the last 500B (`deepseek_jax/train/schedules.py`):
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:v3-671b --workdir=/mnt/shared/runs/v3
  v3-671b-32k, v3-671b-128k
           V3's two context-extension phases (§4.3), each from the previous phase's run
           directory: YaRN on (s = 40 over the 4K pretraining length, as in the released
           config), 32K sequences × 1920 for 1000 steps, then 128K × 480 for 1000 steps, lr
           7.3e-6 (the pretraining run's last value):
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:v3-671b-32k --workdir=/mnt/shared/runs/v3-32k --config.init.pretrain_dir=/mnt/shared/runs/v3
           python -m experiments.pretrain --config=experiments/configs/pretrain.py:v3-671b-128k --workdir=/mnt/shared/runs/v3-128k --config.init.pretrain_dir=/mnt/shared/runs/v3-32k
  tiny-ext tests: an extension phase of a `tiny` run (YaRN s = 2 over its 32-token pretraining
           length, 64-token sequences).

Positions: pretraining runs use plain RoPE (`model.rope_factor=1`), as DeepSeek pretrained; YaRN
is switched on only by the extension phases, which start from a pretraining run's parameters
and routing bias (`init.pretrain_dir`; a fresh optimizer at step 0). Models imported from
released weights keep the YaRN of their config.json.

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
from deepseek_jax.model import adapters
from deepseek_jax.train.checkpoint import load_model_config
from deepseek_jax.train.schedules import steps_for_tokens


# LoRA adapters are set by a fine-tuning run's `adapter` section (`adapter_fields`), not `model`.
ADAPTER_FIELDS = ("adapter_rank", "adapter_alpha", "adapter_targets")


def model_fields(config: ModelConfig) -> ml_collections.ConfigDict:
    """A ModelConfig as a ConfigDict of plain values (dtypes by name), adapters left out."""
    return ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                      if k not in ADAPTER_FIELDS})


def finetune_mesh_fields(preset: str) -> ml_collections.ConfigDict:
    """`mesh_fields` plus `num_devices`, for the SFT, DPO and GRPO configs."""
    m = mesh_fields(preset)
    m.num_devices = 0                # use the first N devices of a single process; 0 = all
    return m


def finetune_optim_fields(lr: float, warmup: int, final_fraction: float,
                          weight_decay: float) -> ml_collections.ConfigDict:
    """The `optim` section of the SFT and DPO configs: AdamW, a linear warm-up, then a cosine
    to final_fraction·lr at the last step (`schedule="constant"` holds lr instead)."""
    o = ml_collections.ConfigDict()
    o.lr = lr
    o.warmup_steps = warmup
    o.schedule = "cosine"
    o.final_fraction = final_fraction
    o.weight_decay = weight_decay
    o.clip_norm = 1.0
    o.b1 = 0.9
    o.b2 = 0.95
    return o


def adapter_fields() -> ml_collections.ConfigDict:
    """The `adapter` section of the SFT and GRPO configs: LoRA adapters (model/adapters.py)."""
    a = ml_collections.ConfigDict()
    a.rank = 0                         # r; 0 = train every weight (no adapters)
    a.alpha = 16.0                     # the update is (alpha / r)·A·B
    # comma-separated: groups attention, mlp (dense FFNs, shared experts), experts (routed),
    # or single weights such as attention.w_o
    a.targets = "attention,mlp"
    # the frozen weights' storage: "" = as the starting run saved them; "bfloat16" halves them
    a.frozen_dtype = ""
    # checkpoints hold the adapters alone, the frozen weights read back from the starting run
    # (which must keep that step); True writes them into every checkpoint too
    a.save_frozen = False
    return a


def with_adapters(model_config: ModelConfig, run_config) -> ModelConfig:
    """`model_config` with the run config's `adapter` section (none when its rank is 0)."""
    a = run_config.adapter
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    stored = {"param_dtype": jnp.dtype(a.frozen_dtype).type} if a.rank and a.frozen_dtype else {}
    return model_config.replace(adapter_rank=a.rank, adapter_alpha=a.alpha,
                                adapter_targets=targets, **stored)


def starting_model(run_config, pretrained: str) -> ModelConfig:
    """The model of an SFT or GRPO run: the starting run's (`pretrained`; merged, if it was
    trained with adapters) or the run config's `model`, with its `adapter` section."""
    model = (adapters.plain(load_model_config(pretrained)) if pretrained
             else to_model_config(run_config.model))
    return with_adapters(model, run_config)


def to_model_config(fields) -> ModelConfig:
    """The inverse of `model_fields`."""
    return ModelConfig.from_dict(fields)


# V3 pretraining (§4.2): 14.8T tokens of 4096; 15360 sequences per step after a ramp from 3072
# over the first 469B tokens, in micro-batches of 768 (20 per full step).
_V3_TOKENS = 14.8e12
_V3_MICROBATCHES = 20
_V3_RAMP = (3072, 469e9 / _V3_TOKENS)
_V3_STEPS = steps_for_tokens(_V3_TOKENS, 15360 // _V3_MICROBATCHES * 4096, _V3_MICROBATCHES,
                             _V3_RAMP[0] * _V3_MICROBATCHES // 15360, _V3_RAMP[1])
_T = lambda tokens: tokens / _V3_TOKENS          # a token count as a fraction of the run

_RUNS = {
    #        model      batch seq steps  lr     warmup preset      remat
    "tiny": ("tiny", 8, 32, 20, 3e-3, 2, "dp", "none"),
    # small: 8 × 128 for 2,400 steps learns two-digit + and − (20–97 % right over seeds and
    # hosts when made to work them out); 16 × 128 for 1,200 steps, the same tokens, stayed near
    # 20 % (BENCHMARKS.md)
    "small": ("small", 8, 128, 2400, 3e-3, 10, "dp", "none"),
    "v2-lite": ("v2-lite", 1024, 4096, 100_000, 4.2e-4, 2000, "fsdp_ep", "full"),
    "v3-671b": ("v3-671b", 15360, 4096, _V3_STEPS, 2.2e-4, 2000, "fsdp_ep", "full"),
    # Context extension (§4.3): from a pretraining run, YaRN on.
    "v3-671b-32k": ("v3-671b", 1920, 32768, 1000, 7.3e-6, 0, "fsdp_ep", "full"),
    "v3-671b-128k": ("v3-671b", 480, 131072, 1000, 7.3e-6, 0, "fsdp_ep", "full"),
    "tiny-ext": ("tiny", 8, 64, 6, 1e-3, 0, "dp", "none"),
}
_EXTENSIONS = ("v3-671b-32k", "v3-671b-128k", "tiny-ext")


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    if arg not in _RUNS:
        raise ValueError(f"unknown run config {arg!r}; use one of {sorted(_RUNS)}")
    model, batch, seq, steps, lr, warmup, preset, remat = _RUNS[arg]
    c = ml_collections.ConfigDict()
    c.name = arg
    c.seed = 0
    c.model = _model(arg, model, remat)
    c.init = ml_collections.ConfigDict()
    # A run directory to start from (its latest checkpoint's parameters and routing bias, with
    # a fresh optimizer at step 0) when WORKDIR holds no checkpoint yet; "" = random init.
    c.init.pretrain_dir = ""
    # Extension phases must start from a run: an empty pretrain_dir is then an error.
    c.init.required = arg in _EXTENSIONS
    c.data = _data(arg, model, batch, seq)
    c.mesh = mesh_fields(preset)
    c.optim = _optim(arg, lr, warmup)
    c.train = _train(arg, model, steps)
    return c


def _model(arg: str, model: str, remat: str) -> ml_collections.ConfigDict:
    # The tiny model's 64-id vocabulary is too small for the byte tokenizer's 259 ids.
    overrides = {"vocab_size": 320} if model == "tiny" else {}
    if arg not in _EXTENSIONS:
        overrides["rope_factor"] = 1.0      # pretraining: plain RoPE (YaRN is for extension)
    elif model == "tiny":
        overrides.update(rope_factor=2.0, rope_original_max_len=32)   # tiny pretrains at 32
    if arg == "small":
        # Four layers unrolled: on a CPU, 10–20 % less time per step than scanned and half
        # the compile (the scan stacks every layer's activations for the backward pass).
        overrides["scan_layers"] = False
    if model not in ("tiny", "small"):
        overrides["dtype"] = jnp.bfloat16
    return model_fields(get_model_config(model, remat_policy=remat, **overrides))


def _data(arg: str, model: str, batch: int, seq: int) -> ml_collections.ConfigDict:
    small = model in ("tiny", "small")
    d = ml_collections.ConfigDict()
    d.dataset = "arithmetic" if small else "text_files"   # arithmetic, countdown, text_files
    d.data_dir = ""            # where the array_record files live; "" = WORKDIR/data
    d.num_train = 2000 if model == "tiny" else 8000         # procedural tasks only
    d.num_eval = 200
    # "text", or an R1 template ("compact", "r1_zero"): prompt + <think>…</think><answer>…</answer>
    d.template = "compact" if arg == "small" else "text"
    # R1 templates only: shares of the problems written as bare lines ("43+27=70"), and worked
    # out column by column in the think block (see deepseek_jax/data/run_config.py).
    # small: ¾ bare lines (~6× more problems per token) is what made short runs learn the
    # arithmetic (BENCHMARKS.md).
    d.plain_fraction = 0.75 if arg == "small" else 0.0
    d.worked_fraction = 0.0
    # R1 templates only: share of the R1-template problems written as a rough estimate
    # (operands rounded to tens; usually a wrong answer) instead of exact work: a careless habit
    # next to the exact one, for GRPO to select against (small: the demo, experiments/demo.py).
    d.estimate_fraction = 0.6 if arg == "small" else 0.0
    d.max_digits = 2 if arg == "small" else 3   # arithmetic: operand digits, at most ...
    d.min_digits = 2 if arg == "small" else 1   # ... and at least
    d.ops = "+-" if arg == "small" else "+-*"   # arithmetic: operators
    d.text_glob = ""           # text_files: files or a glob (.txt, .jsonl)
    d.text_field = "text"      # text_files: the JSONL field holding the text
    d.validation_fraction = 0.01  # text_files: share of documents held out for evaluation
    d.tokenizer = ""           # "" = the byte tokenizer; or a tokenizer.json path
    d.seq_len = seq
    d.global_batch = batch
    d.shuffle_seed = 0
    # Training data shards, each process reading an equal share; 0 = one per process (or, on
    # resume, the checkpoint's count). A fixed count keeps every step's batch the same on any
    # process count that divides it (deepseek_jax/data/run_config.py).
    d.shards = 0
    return d


def mesh_fields(preset: str) -> ml_collections.ConfigDict:
    """The `mesh` section of every run config (the fine-tuning stages add `num_devices`:
    `finetune_mesh_fields`)."""
    m = ml_collections.ConfigDict()
    m.preset = preset          # dp, fsdp, fsdp_tp, fsdp_ep, dp_ep_tp, fsdp_cp, fsdp_ep_cp,
                               # fsdp_pp, fsdp_ep_pp
    # Axis sizes; all 0 = the preset's default shape for the devices found. -1 = the rest.
    m.dcn_data = 0
    m.data = 0
    m.stage = 0
    m.fsdp = 0
    m.context = 0
    m.expert = 0
    m.tensor = 0
    # Pipeline (stage > 1): the schedule's micro-batches; 0 = the model's (2 × stage).
    m.pipeline_microbatches = 0
    m.distributed = ml_collections.FieldReference(None, field_type=bool)  # None = detect
    return m


def _optim(arg: str, lr: float, warmup: int) -> ml_collections.ConfigDict:
    v3 = arg == "v3-671b"
    o = ml_collections.ConfigDict()
    o.lr = lr
    o.warmup_steps = warmup
    # cosine, step (DeepSeek: ×0.316 at 80% and 90%), constant, or deepseek_v3: constant until
    # the fraction constant_until of the run's tokens, cosine to final_fraction·lr by
    # cosine_until, then the (fraction, lr) points of `tail` (deepseek_jax/train/optimizer.py)
    o.schedule = "deepseek_v3" if v3 else "constant" if arg in _EXTENSIONS else "cosine"
    o.final_fraction = 0.1
    o.constant_until = _T(10e12) if v3 else 0.0
    o.cosine_until = _T(14.3e12) if v3 else 1.0
    o.tail = ((_T(14.3e12), 2.2e-5), (_T(14.3e12 + 333e9), 7.3e-6)) if v3 else ()
    o.weight_decay = 0.1
    o.clip_norm = 1.0
    o.b1 = 0.9
    o.b2 = 0.95
    return o


def _train(arg: str, model: str, steps: int) -> ml_collections.ConfigDict:
    v3, extension = arg == "v3-671b", arg in _EXTENSIONS
    t = ml_collections.ConfigDict()
    t.steps = steps
    t.microbatches = _V3_MICROBATCHES if v3 else 1  # gradient accumulation
    # Batch-size ramp: sequences per step at the start (0 = none), growing linearly in tokens to
    # data.global_batch over the fraction batch_ramp_fraction of the run, in whole micro-batches
    # of global_batch / microbatches sequences (deepseek_jax/train/schedules.py).
    t.batch_ramp_start = _V3_RAMP[0] if v3 else 0
    t.batch_ramp_fraction = _V3_RAMP[1] if v3 else 0.0
    # Loss weights and the routing-bias update speed (V3 §4.2: λ 0.3, α 1e-4, γ 0.001).
    # V3 does not state λ and γ for the extension phases: the values pretraining ended with.
    # V2's models (no routing bias) balance with the auxiliary loss alone, α = 0.001 (V2 §4.2).
    # Small runs of tens of steps: a faster γ than V3's (tuned for 1e5 steps) lets the
    # aux-loss-free balancing visibly act.
    t.mtp_weight = 0.1 if extension and model != "tiny" else 0.3
    t.balance_alpha = 1e-3 if model == "v2-lite" else 1e-4
    t.bias_update_rate = (0.01 if model in ("tiny", "small") else
                          0.0 if extension else 0.001)
    # (fraction of the run's tokens, value) points overriding the constants above; () = none
    t.mtp_weight_schedule = ((0.0, 0.3), (_T(10e12), 0.1)) if v3 else ()
    t.bias_rate_schedule = ((0.0, 0.001), (_T(14.3e12), 0.0)) if v3 else ()
    t.log_every = 1 if arg == "tiny" else 10
    t.eval_every = 10 if arg == "tiny" else 100
    t.eval_batches = 2 if model in ("tiny", "small") else 20
    t.checkpoint_every = 5 if arg == "tiny" else 100
    t.keep_checkpoints = 3
    t.async_checkpoint = True
    # Steps whose work jax.profiler traces into WORKDIR/profile: "A,B" (steps A to B), "N" (N
    # steps after the first one run), "" none (deepseek_jax/train/run.py)
    t.profile_steps = ""
    # A Weights & Biases project to log metrics to as well (needs `pip install wandb`); "" = none
    t.wandb_project = ""
    return t
