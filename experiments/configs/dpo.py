"""DPO run configs for the command line: `--config=experiments/configs/dpo.py:NAME`.

The configs themselves are `deepseek_jax.configs.dpo` (its docstring lists NAME and each run's
launch command); this file hands them to `ml_collections.config_flags`, which loads a config by
file path.
"""

from deepseek_jax.configs.dpo import get_config

__all__ = ["get_config"]
