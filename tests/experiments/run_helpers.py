"""What the fine-tuning tests start from: a run directory as pretraining leaves it."""

import os

import jax

from deepseek_jax.configs.pretrain import to_model_config
from deepseek_jax.configs.sft import get_config
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import init_train_state


def make_start_run(path: str, seeds, first_step: int = 1) -> list:
    """model_config.json (the fine-tuning configs' `tiny` model) and one Orbax checkpoint per
    seed, at steps first_step, first_step + 1, …, each with the weights of its seed. Returns
    the TrainStates saved."""
    model_config = to_model_config(get_config("tiny").model)
    manager = ckpt.make_manager(os.path.join(path, "checkpoints"), save_every=1, keep=5,
                                async_save=False)
    states = []
    for step, seed in enumerate(seeds, first_step):
        states.append(init_train_state(jax.random.key(seed), model_config, make_optimizer(1e-3)))
        ckpt.save(manager, step, states[-1], jax.random.key(0), {}, force=True)
    manager.wait_until_finished()
    manager.close()
    ckpt.save_model_config(path, model_config)
    return states
