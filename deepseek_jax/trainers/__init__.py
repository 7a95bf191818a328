"""The training loops, one per stage: `pretrain.train_and_evaluate(config, workdir)`,
`grpo.train_and_evaluate(config, workdir)`, `sft.train_and_evaluate(config, workdir)` and
`dpo.train_and_evaluate(config, workdir)`, with `config` from `deepseek_jax.configs`.

Each reads top to bottom (mesh → data → model → shardings → step → checkpoint → loop) and is
what the command-line entrypoints in experiments/, the tests and the notebooks call. They sit
above every other package: nothing in `deepseek_jax` imports them.
"""
