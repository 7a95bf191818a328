"""Hugging Face DeepSeek-V2/V3 checkpoints: import into our layout (from a folder or the hub),
conversion to Orbax, and export of a run back to a Hugging Face folder.

  config, variables = load_hf_checkpoint(path)            # folder: config.json + safetensors
  logits, mtp_logits = Transformer(config).apply(variables, tokens)

  python -m deepseek_jax.hf.convert --hf=DIR --out=DIR --preset=fsdp --mesh=fsdp=8 \
      --dtype=bfloat16                                     # sharded Orbax checkpoint, streamed
  config, variables = restore_converted(DIR, mesh, rules)  # back onto any mesh
  state = train_state_from_converted(DIR, config, tx, mesh, rules)   # a run's step 0

  config, variables = load_hf_checkpoint("deepseek-ai/DeepSeek-V3", revision="main")  # hub id

  python -m deepseek_jax.hf.export --run=RUN --out=HF_DIR [--fp8]  # a run → HF folder, streamed

Files: `safetensors_io.py` (lazy memory-mapped reading of safetensors, fp8 included; a small
writer for tests), `fp8_blocks.py` (128×128 block dequantization), `hf_config.py` (config.json
→ ModelConfig, both the hub's and transformers-5's spelling), `mapping.py` (which HF tensor,
rows and columns each of our parameters comes from), `reader.py` (reading whole leaves or single
shards, straight onto devices), `loader.py` (`load_hf_checkpoint`), `hub.py` (hub ids:
downloads into the hub's cache), `convert.py` (the converter CLI and `restore_converted`), `writer.py` (sharded
safetensors written tensor by tensor), `export.py` (the export CLI and `export_run`).

Supported: model_type deepseek_v3 (DeepSeek-V3/R1, Moonlight, with or without q compression,
fp8 or bf16/fp32 weights, MTP at model.layers.{num_hidden_layers}) and deepseek_v2 (V2,
V2-Lite: softmax routing, greedy or group-limited). Parity with transformers' DeepseekV3 /
DeepseekV2 models is tested on tiny fixtures (tests/hf).
"""

from deepseek_jax.hf.hf_config import HFCheckpointError, read_hf_config
from deepseek_jax.hf.loader import MTPWeightsMissing, load_hf_checkpoint


def __getattr__(name):
    # convert.py and export.py are also run as `python -m`; importing them here eagerly would
    # make runpy warn.
    if name in ("convert_to_orbax", "restore_converted", "train_state_from_converted"):
        from deepseek_jax.hf import convert
        return getattr(convert, name)
    if name == "export_run":
        from deepseek_jax.hf import export
        return export.export_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HFCheckpointError", "MTPWeightsMissing", "convert_to_orbax", "export_run",
           "load_hf_checkpoint",
           "read_hf_config", "restore_converted", "train_state_from_converted"]
