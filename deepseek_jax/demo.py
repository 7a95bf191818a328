"""The default job: a short training run of the `small` model on built-in arithmetic text.

    python -m deepseek_jax.demo [--steps 60] [--batch 16] [--length 64]

It prints the loss parts every few steps and a final check that the loss fell. This is the
README's main command; it grows into pretrain → GRPO → evaluation as those pieces land.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import get_config
from deepseek_jax.data import synthetic, tokenizer
from deepseek_jax.model import count_params
from deepseek_jax.train.optimizer import learning_rate_schedule, make_optimizer
from deepseek_jax.train.step import init_train_state, train_step


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    config = get_config("small")
    if config.vocab_size < tokenizer.VOCAB_SIZE:
        raise SystemExit(f"vocab_size {config.vocab_size} < tokenizer's {tokenizer.VOCAB_SIZE}")
    n = count_params(config)
    print(f"model 'small': {n['total'] / 1e6:.2f}M params ({n['active'] / 1e6:.2f}M active, "
          f"{n['mtp'] / 1e6:.2f}M MTP), {config.n_layers} layers, "
          f"{config.n_routed_experts} routed experts (top-{config.n_experts_per_token})")

    tx = make_optimizer(learning_rate_schedule(args.lr, args.steps // 10, args.steps))
    state = init_train_state(jax.random.key(args.seed), config, tx)
    step_fn = jax.jit(lambda s, b: train_step(s, b, config=config, tx=tx), donate_argnums=0)

    first = last = None
    t0 = time.time()
    for step in range(args.steps):
        tokens = synthetic.arithmetic_batch(args.seed * 100_003 + step, args.batch, args.length)
        state, m = step_fn(state, {"tokens": jnp.asarray(tokens)})
        if step % 10 == 0 or step == args.steps - 1:
            m = jax.device_get(m)
            first = m["lm_loss"] if first is None else first
            last = m["lm_loss"]
            print(f"step {step:4d}  loss {m['loss']:.4f}  lm {m['lm_loss']:.4f}  "
                  f"mtp {m['mtp_loss']:.4f}  balance {m['balance_loss']:.3f}  "
                  f"load max/mean {m.get('load_imbalance', np.nan):.2f}  "
                  f"({time.time() - t0:.1f}s)", flush=True)
    print(f"lm loss {first:.3f} → {last:.3f} in {args.steps} steps "
          f"({'falling' if last < first else 'NOT falling'})")
    return float(last)


if __name__ == "__main__":
    main()
