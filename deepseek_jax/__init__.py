"""deepseek_jax: DeepSeek-V3/R1 techniques in JAX and Flax, built to run on TPU and GPU pods.

Packages: `config` (ModelConfig and named variants), `model` (MLA, DeepSeekMoE, MTP),
`train` (losses, optimizer, train step), `data`, `kernels`, `parallel`, `sampling`, `rl`,
`checkpoint`, `tools`.
"""

__version__ = "0.1.0"
