"""DPO run configs: `--config=experiments/configs/dpo.py:NAME`, NAME one of

  tiny     tests: a randomly initialized tiny model (or --config.init.pretrain_dir=RUN) on a
           JSONL of preference pairs, seconds on one CPU:
           python -m experiments.dpo --config=experiments/configs/dpo.py:tiny --workdir=runs/dpo_tiny \\
               --config.data.path=pairs.jsonl
  small    the CPU demo's model on pairs of its own samples, a right and a wrong answer to the
           same problem (`experiments.rejection_sample --keep=pairs`, README):
           python -m experiments.dpo --config=experiments/configs/dpo.py:small --workdir=runs/demo/dpo \\
               --config.init.pretrain_dir=runs/demo/pretrain --config.data.path=runs/demo/pairs.jsonl
  v3-671b  DPO of a DeepSeek-V3 chat model from a converted HF checkpoint (`python -m
           deepseek_jax.hf.convert`) with its tokenizer.json and chat template. The learning
           rate (5e-6), batch (512 pairs), one epoch and the cosine schedule with warmup are
           those DeepSeek LLM's DPO stage reports; β = 0.1 is the DPO paper's; the sequence
           length and mesh are this project's choices:
           python -m experiments.dpo --config=experiments/configs/dpo.py:v3-671b \\
               --workdir=/mnt/shared/runs/v3-dpo --config.init.pretrain_dir=/mnt/shared/v3-sft \\
               --config.data.path=/data/pairs.jsonl --config.data.tokenizer=/mnt/shared/v3-hf/tokenizer.json

Start from a run directory (`init.pretrain_dir`: a pretraining, SFT, GRPO or DPO run, or a
converted HF checkpoint; a run trained with adapters starts this one merged) or from a random
`model` (tests). That starting model is also the reference π_ref. `data.global_batch` counts
pairs (each is two sequences); `train.steps` 0 means `train.epochs` passes over the pairs.
Every field can be overridden on the command line; the config is locked, so a misspelled field
is an error.
"""

from __future__ import annotations

import ml_collections

from deepseek_jax.config import get_config as get_model_config
from deepseek_jax.configs.pretrain import (adapter_fields, finetune_mesh_fields,
                                           finetune_optim_fields, model_fields)

_RUNS = {
    #            model     seq  pairs steps epochs lr    warmup mb preset
    "tiny": ("tiny", 64, 8, 6, 0, 1e-3, 1, 1, "dp"),
    "small": ("small", 128, 16, 0, 2, 1e-5, 5, 1, "dp"),
    "v3-671b": ("v3-671b", 4096, 512, 0, 1, 5e-6, 10, 1, "fsdp_ep"),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    if arg not in _RUNS:
        raise ValueError(f"unknown DPO config {arg!r}; use one of {sorted(_RUNS)}")
    model, seq, pairs, steps, epochs, lr, warmup, microbatches, preset = _RUNS[arg]
    c = ml_collections.ConfigDict()
    c.name = arg
    c.seed = 0

    c.init = ml_collections.ConfigDict()
    c.init.pretrain_dir = ""         # the run to start from (and the reference); "" = random
    c.model = model_fields(get_model_config(model, **({"vocab_size": 320} if arg == "tiny"
                                                      else {})))
    # LoRA adapters on the starting weights; the reference is then the policy with its adapters
    # off: --config.adapter.rank=16
    c.adapter = adapter_fields()

    d = c.data = ml_collections.ConfigDict()
    d.path = ""                      # JSONL of {"prompt", "chosen", "rejected"} (data/preference.py)
    d.eval_path = ""                 # held-out JSONL; "" = hold out validation_fraction of path
    d.validation_fraction = 0.05
    d.hf_dataset = ""                # instead of path: an HF `datasets` name (package optional)
    d.hf_split = "train"
    d.hf_eval_split = ""             # "" = hold out validation_fraction of hf_split
    d.tokenizer = ""                 # "" = the byte tokenizer; else an HF tokenizer.json
    d.chat_template = ""             # a tokenizer_config.json; "" as for SFT (data/chat.py)
    d.seq_len = seq                  # prompt + response, each side
    d.global_batch = pairs           # pairs a step
    d.shuffle_seed = 0

    p = c.dpo = ml_collections.ConfigDict()
    p.beta = 0.1                     # β: how far from the reference the policy may move
    p.loss_type = "sigmoid"          # "sigmoid" (DPO), "ipo" or "hinge" (rl/dpo.py)
    p.label_smoothing = 0.0          # conservative DPO's flip probability (sigmoid only)
    # weight of the chosen response's mean token NLL (RPO). 1 in `small`: on the demo's three
    # seeds it ended at 94.5 / 21.0 / 87.0 % held-out against plain DPO's 89.5 / 21.0 / 74.5 %
    # (BENCHMARKS.md): the wrong answers share tokens with right ones, and plain DPO pushed
    # some right ones down with them
    p.sft_weight = 1.0 if arg == "small" else 0.0

    c.optim = finetune_optim_fields(lr, warmup, 0.1, 0.0)
    c.mesh = finetune_mesh_fields(preset)

    t = c.train = ml_collections.ConfigDict()
    t.steps = steps                  # 0 = epochs × ceil(training pairs / global_batch)
    t.epochs = epochs
    # gradient accumulation over k strided groups of pairs: less activation memory, as long
    # as global_batch / k pairs still split over the mesh's batch axes (checked at start-up)
    t.microbatches = microbatches
    # γ: the routing bias frozen, as in SFT outside the tests (tiny moves it, to test that path)
    t.bias_update_rate = 1e-3 if arg == "tiny" else 0.0
    t.log_every = 1 if arg == "tiny" else 10
    t.eval_every = 3 if arg == "tiny" else 25   # held-out DPO metrics; 0 = never
    t.checkpoint_every = 4 if arg == "tiny" else 100
    t.keep_checkpoints = 2
    t.async_checkpoint = True
    return c
