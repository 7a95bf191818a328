"""SFT run configs: `--config=experiments/configs/sft.py:NAME`, NAME one of

  tiny     tests: a randomly initialized tiny model (or --config.init.pretrain_dir=RUN) on a
           JSONL of conversations, seconds on one CPU:
           python -m experiments.sft --config=experiments/configs/sft.py:tiny --workdir=runs/sft_tiny \\
               --config.data.path=conversations.jsonl
  small    stage 3 of the CPU demo: SFT of the demo's GRPO model on its own rejection samples
           (`experiments.rejection_sample`, README), byte tokenizer and its built-in template:
           python -m experiments.sft --config=experiments/configs/sft.py:small --workdir=runs/demo/sft \\
               --config.init.pretrain_dir=runs/demo/grpo --config.data.path=runs/demo/rejection.jsonl
  v3-671b  SFT of DeepSeek-V3-Base from a converted HF checkpoint (`python -m
           deepseek_jax.hf.convert`), its tokenizer.json and the chat template of the
           tokenizer_config.json beside it. V3's report (§5.1) gives two epochs, a cosine from
           5e-6 to 1e-6 and packed sequences with sample masking; the sequence length and batch
           here are this project's choices (the report does not state them):
           python -m experiments.sft --config=experiments/configs/sft.py:v3-671b \\
               --workdir=/mnt/shared/runs/v3-sft --config.init.pretrain_dir=/mnt/shared/v3-orbax \\
               --config.data.path=/data/sft.jsonl --config.data.tokenizer=/mnt/shared/v3-hf/tokenizer.json

Start from a run directory (`init.pretrain_dir`: a pretraining, GRPO or SFT run, or a converted
HF checkpoint; its model_config.json decides the model) or from a random `model` (tests).
`train.steps` 0 means `train.epochs` passes over the training rows. Every field can be
overridden on the command line; the config is locked, so a misspelled field is an error.
"""

from __future__ import annotations

import ml_collections

from deepseek_jax.config import get_config as get_model_config
from deepseek_jax.configs.pretrain import (adapter_fields, finetune_mesh_fields,
                                           finetune_optim_fields, model_fields)

_RUNS = {
    #            model     seq   batch steps epochs lr     final  warmup preset
    "tiny": ("tiny", 64, 8, 16, 0, 3e-3, 0.1, 2, "dp"),
    "small": ("small", 128, 16, 0, 2, 3e-5, 0.1, 5, "dp"),
    "v3-671b": ("v3-671b", 4096, 512, 0, 2, 5e-6, 0.2, 0, "fsdp_ep"),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    if arg not in _RUNS:
        raise ValueError(f"unknown SFT config {arg!r}; use one of {sorted(_RUNS)}")
    model, seq, batch, steps, epochs, lr, final, warmup, preset = _RUNS[arg]
    c = ml_collections.ConfigDict()
    c.name = arg
    c.seed = 0

    c.init = ml_collections.ConfigDict()
    c.init.pretrain_dir = ""         # a run directory to start from; "" = random init of `model`
    c.model = model_fields(get_model_config(model, **({"vocab_size": 320} if arg == "tiny"
                                                      else {})))
    # LoRA adapters on the starting weights (a run trained with them starts this one merged):
    # --config.adapter.rank=16 trains the adapters only (optimizer state for them alone).
    c.adapter = adapter_fields()

    d = c.data = ml_collections.ConfigDict()
    d.path = ""                      # JSONL: {"messages": [...]} or {"prompt", "completion"}
    d.eval_path = ""                 # held-out JSONL; "" = hold out validation_fraction of path
    d.validation_fraction = 0.05
    d.hf_dataset = ""                # instead of path: an HF `datasets` name (package optional)
    d.hf_split = "train"
    d.hf_eval_split = ""             # "" = hold out validation_fraction of hf_split
    d.tokenizer = ""                 # "" = the byte tokenizer; else an HF tokenizer.json
    # A tokenizer_config.json whose chat_template renders the conversations; "" = the one beside
    # `tokenizer`, or the byte tokenizer's built-in template (deepseek_jax/data/chat.py)
    d.chat_template = ""
    d.seq_len = seq
    d.global_batch = batch
    d.pack = True                    # several samples per row, kept apart (data/sft.py)
    d.shuffle_seed = 0

    c.optim = finetune_optim_fields(lr, warmup, final, 0.1 if arg == "v3-671b" else 0.0)
    c.mesh = finetune_mesh_fields(preset)

    t = c.train = ml_collections.ConfigDict()
    t.steps = steps                  # 0 = epochs × ceil(training rows / global_batch)
    t.epochs = epochs
    t.microbatches = 1
    # λ, α and γ as in pretraining; the routing bias is frozen (γ = 0) outside the tests: a
    # short fine-tune's loads are a narrow, noisy signal (as in the demo's GRPO run)
    t.mtp_weight = 0.3 if arg == "tiny" else 0.1
    t.balance_alpha = 1e-4
    t.bias_update_rate = 0.01 if arg == "tiny" else 0.0
    t.log_every = 1 if arg == "tiny" else 10
    t.eval_every = 4 if arg == "tiny" else 25   # held-out assistant-token loss; 0 = never
    t.checkpoint_every = 8 if arg == "tiny" else 100
    t.keep_checkpoints = 2
    t.async_checkpoint = True
    return c
