"""Run configs (`ml_collections.ConfigDict`) for the trainers in `deepseek_jax.trainers`.

`pretrain.get_config(NAME)`, `grpo.get_config(NAME)`, `sft.get_config(NAME)` and
`dpo.get_config(NAME)` build the named
runs; the command line reaches the same functions through experiments/configs/*.py
(`--config=FILE:NAME`). They live in the package so that an installed copy (a notebook, a script
outside the checkout) can build the runs the README documents. The model's own settings are
`deepseek_jax.config.ModelConfig`, carried in each run config's `model` field.
"""
