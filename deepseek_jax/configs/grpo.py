"""GRPO run configs: `--config=experiments/configs/grpo.py:NAME`, NAME one of

  tiny    tests: a randomly initialized tiny model, a few steps:
          python -m experiments.grpo --config=experiments/configs/grpo.py:tiny --workdir=/tmp/grpo_tiny
  small   the CPU demo, from a `small` pretraining run (see experiments/demo.py):
          python -m experiments.grpo --config=experiments/configs/grpo.py:small --workdir=/tmp/grpo \\
              --config.init.pretrain_dir=/tmp/pretrain
  v3-671b R1-Zero on DeepSeek-V3 from an imported HF checkpoint (converted with
          `python -m deepseek_jax.hf.convert`), R1-Zero's published settings:
          python -m experiments.grpo --config=experiments/configs/grpo.py:v3-671b \\
              --workdir=/mnt/shared/runs/r1zero --config.init.pretrain_dir=/mnt/shared/v3-orbax

Start from a pretraining run (`init.pretrain_dir`: its latest checkpoint and model_config.json)
or from scratch (`init.pretrain_dir=""`, for tests). Every field can be overridden on the command
line; the config is locked, so a misspelled field is an error.
"""

from __future__ import annotations

import ml_collections

from deepseek_jax.configs.pretrain import adapter_fields, finetune_mesh_fields, model_fields
from deepseek_jax.config import get_config as get_model_config
from deepseek_jax.rl.rewards import FORMAT_WEIGHTS

_RUNS = {
    #           model   task          prompts G  new  steps  lr     template   beta   mu
    "tiny": ("tiny", "arithmetic", 4, 4, 12, 4, 1e-3, "compact", 0.04, 2),
    # small: G = 16 as R1-Zero samples; 8 × 16 beat 16 × 8 (the same 128 completions a step) on
    # three seeds, +12.2 against +10.7 points on average (BENCHMARKS.md)
    "small": ("small", "arithmetic", 8, 16, 48, 60, 3e-5, "compact", 0.0, 1),
    "v3-671b": ("v3-671b", "countdown", 32, 16, 32768, 10400, 3e-6, "r1_zero", 0.001, 1),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    if arg not in _RUNS:
        raise ValueError(f"unknown GRPO config {arg!r}; use one of {sorted(_RUNS)}")
    model, task, prompts, group, new, steps, lr, template, beta, mu = _RUNS[arg]
    c = ml_collections.ConfigDict()
    c.name = arg
    c.seed = 0

    c.init = ml_collections.ConfigDict()
    c.init.pretrain_dir = ""        # a training run's directory; "" = random init from `model`
    # Used only when pretrain_dir is empty (the run's model_config.json wins otherwise).
    c.model = model_fields(get_model_config(model, **({"vocab_size": 320} if arg == "tiny"
                                                      else {})))
    # LoRA adapters on the starting weights (a run trained with them starts this one merged):
    # --config.adapter.rank=16 trains the adapters only, and with β > 0 the reference model is
    # the policy with them off rather than a second copy of the weights.
    c.adapter = adapter_fields()

    c.data = ml_collections.ConfigDict()
    c.data.dataset = task            # arithmetic or countdown
    c.data.data_dir = ""             # "" = WORKDIR/data
    c.data.num_train = 8000          # two-digit + and − have ~10k distinct problems
    c.data.num_eval = 200
    c.data.max_digits = 2
    c.data.min_digits = 2            # fixed-width operands: digits at fixed prompt positions
    c.data.ops = "+-"
    # r1_zero (R1's Table 1: ends "Assistant:"), r1_zero_think (the same, "<think>" prefilled) or
    # compact (question + " <think>": short, for small models); see deepseek_jax/rl/rewards.py
    c.data.template = template
    c.data.tokenizer = ""            # "" = the byte tokenizer; an HF model: its tokenizer.json

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_step = prompts
    c.rl.group_size = group          # G completions per prompt
    c.rl.max_new_tokens = new
    # rollouts (deepseek_jax/rl/rollout.py): "continuous" batching over rollout_slots rows with
    # each prompt prefilled once, "static" (shared prefill, all rows at once; the one that takes
    # speculative=True, MTP draft-and-verify) or "repeated" (each prompt prefilled G times)
    c.rl.rollout = "continuous"
    # rows decoded at once (continuous); 0 = half of prompts_per_step × group_size, so that
    # overriding either keeps a valid value
    c.rl.rollout_slots = 0
    c.rl.speculative = False
    # small: 0.7; at 1.0 the demo model's sampled exact answers are wrong so often that working
    # a problem out earns no more reward than estimating it (BENCHMARKS.md)
    c.rl.temperature = 0.7 if arg == "small" else 1.0
    c.rl.num_iterations = mu         # μ policy updates per batch (old log-probs computed once)
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.2              # DAPO's clip-higher: 0.28
    c.rl.beta = beta                 # k3 KL weight; 0 skips the reference model
    c.rl.advantage_scale = "group"   # group, batch or none (Dr. GRPO)
    c.rl.aggregation = "seq_mean_token_mean"  # or token_mean (DAPO), seq_mean_token_sum_norm
    # total reward = accuracy + format_weight·format: R1 adds the two (1.0); the small runs keep
    # TinyZero's 0.1 (rl.rewards.FORMAT_WEIGHTS names both)
    c.rl.format_weight = FORMAT_WEIGHTS["r1" if arg == "v3-671b" else "tinyzero"]
    # γ of the routing-bias update during RL: V3's 0.001, or 0 to freeze the bias (small: a few
    # hundred short completions per step are a noisy load signal, and each sign step moves routing)
    c.rl.bias_update_rate = 0.0 if arg == "small" else 0.001

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = lr
    # small: a low lr and 5 warm-up steps, since a fresh Adam moves every weight by ~lr per
    # step whatever the (noisy, 128-sample) gradient; the lr sweep is in BENCHMARKS.md.
    c.optim.warmup_steps = {"tiny": 0, "small": 5}.get(arg, 10)
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99

    # context parallelism is for pretraining and SFT: leave mesh.context at 0
    c.mesh = finetune_mesh_fields("dp" if arg != "v3-671b" else "fsdp_ep")

    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.log_every = 1 if arg == "tiny" else 5
    c.train.eval_every = 0 if arg == "tiny" else 20
    c.train.eval_problems = 200      # held-out (test split) problems, greedy
    c.train.checkpoint_every = 2 if arg == "tiny" else 20
    c.train.keep_checkpoints = 3
    c.train.samples_to_show = 2      # completions printed at each log step and kept per eval
    # Steps whose work jax.profiler traces into WORKDIR/profile: "A,B" (steps A to B), "N" (N
    # steps after the first one run), "" none (deepseek_jax/train/run.py)
    c.train.profile_steps = ""
    # A Weights & Biases project to log metrics to as well (needs `pip install wandb`); "" = none
    c.train.wandb_project = ""
    return c
