"""Convert a Hugging Face DeepSeek checkpoint into a sharded Orbax checkpoint, streaming.

  python -m deepseek_jax.hf.convert --hf=DeepSeek-V3 --out=/ckpt/v3 \
      --preset=fsdp --mesh=fsdp=-1 --dtype=bfloat16
  python -m deepseek_jax.hf.convert --hf=deepseek-ai/DeepSeek-V3 [--revision=REV] --out=...

`--hf` is a local folder or a hub id (`hf/hub.py`: config, index, the shards it names and the
tokenizer files are downloaded into the Hugging Face cache, resumably, before the conversion).

What it writes (the layout of a training run's directory, minus the optimizer):

  OUT/model_config.json      the ModelConfig (same format as deepseek_jax.train.checkpoint's)
  OUT/hf_config.json         the source config.json, for the record
  OUT/checkpoints/0/state/   Orbax pytree {"params": ..., "routing": ...} in our layout

So `deepseek_jax.train.checkpoint.load_trained(OUT)` (what GRPO starts a policy from) reads it
as it reads a pretraining run, and `restore_converted(OUT, mesh, rules)` here restores it onto
any mesh with the rules' shardings. It is not a full `TrainState` (no step, no optimizer moments:
those depend on the run's optimizer), so `train.checkpoint.restore` — which resumes a run —
does not apply; a run starts from it with `train_state_from_converted` (fresh optimizer state,
step 0, sharded for the run's mesh). experiments/pretrain.py does not call it yet: it needs a
run-config field naming the converted folder, used instead of `init_sharded_state` when the
run has no checkpoint of its own.

Streaming: every leaf is built directly as a sharded jax.Array on the target mesh
(`reader.device_leaf`: each device shard read from the memory-mapped safetensors files on its
own, big shards in `chunk_bytes` pieces), leaves are saved in groups of about `group_bytes`
with Orbax's partial save (`orbax.checkpoint.experimental.v1.partial`, 0.12.4: each call adds
new keys to one pending checkpoint, `finalize` commits it), and each group's arrays are deleted
before the next group is read. Peak memory:

  devices  max(group_bytes, the largest leaf), spread over the mesh (a leaf larger than the
           budget is saved alone);
  host     max(≈6 × chunk_bytes while reading — the read box, fp8 dequantization in fp32, the
           gathered piece, the cast —, this host's share of one group while Orbax writes it).
           Orbax copies an array's local shards to host memory before writing them, so one
           leaf is the floor: for DeepSeek-V3 in bf16 the routed-expert stacks
           [58, 256, 7168, 2048] are 436 GB each over the whole mesh, i.e. 436 GB divided by
           the number of hosts per host. The model (1.34 TB in bf16) is never held by any host.

Left out: keeping fp8 weights in the Orbax checkpoint (they are dequantized to --dtype), and
conversion back to safetensors.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.hf.loader import leaf_dtype, leaf_sharding, prepare, set_path
from deepseek_jax.hf.reader import DEFAULT_CHUNK_BYTES, device_leaf
from deepseek_jax.config import ModelConfig
from deepseek_jax.train import sharded
from deepseek_jax.train.checkpoint import load_model_config, save_model_config
from deepseek_jax.train.workdir import MODEL_CONFIG

DEFAULT_GROUP_BYTES = 4 * 2**30


def _save_group(step_dir: str, group: dict, metadata: dict) -> None:
    from orbax.checkpoint.experimental.v1 import partial
    partial.save(step_dir, group, custom_metadata=metadata)
    for leaf in jax.tree.leaves(group):
        leaf.delete()


def convert_to_orbax(hf_dir: str, out_dir: str, *, preset: str = "fsdp",
            mesh_config: Mapping[str, int] | None = None, dtype: Any = jnp.bfloat16,
            overrides: Mapping[str, Any] | None = None, devices: Sequence | None = None,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            group_bytes: int = DEFAULT_GROUP_BYTES, revision: str | None = None) -> ModelConfig:
    """Writes OUT/checkpoints/0 (Orbax, sharded for the mesh) from the HF folder `hf_dir`.

    Args:
      hf_dir: Hugging Face checkpoint folder, or a hub id ("deepseek-ai/DeepSeek-V3", its
        files downloaded into the Hugging Face cache first; see `load_hf_checkpoint`).
      revision: for a hub id, the branch, tag or commit (default: main).
      out_dir: output folder; OUT/checkpoints/0 must not exist yet.
      preset, mesh_config: parallelism preset and mesh sizes (`parallel.mesh_and_rules`); the
        preset's default mesh when mesh_config is None.
      dtype: storage dtype of the saved parameters (the routing bias stays fp32).
      overrides: ModelConfig fields to set after the HF mapping.
      devices: devices of the mesh (default: all).
      chunk_bytes: host budget of one read (big shards are read in pieces this size).
      group_bytes: how many bytes (global) to build before each partial save.

    Returns:
      the ModelConfig written to OUT/model_config.json.
    """
    from deepseek_jax import parallel
    from deepseek_jax.hf.hub import checkpoint_folder
    from deepseek_jax.train import workdir as run_dir
    hf_dir = run_dir.resolve(checkpoint_folder(hf_dir, revision=revision))  # hub id → its cache
    out_dir = run_dir.resolve(out_dir)          # Orbax needs an absolute path
    step_dir = os.path.join(out_dir, "checkpoints", "0")
    if os.path.exists(step_dir):
        raise FileExistsError(f"{step_dir} exists; convert into a new --out folder")
    p = prepare(hf_dir, dtype=dtype, overrides=overrides)
    mesh, rules = parallel.mesh_and_rules(preset, mesh_config, devices)
    sharded.validate(p.config, mesh, rules)
    run_dir.prepare(out_dir, flag="--out")      # writable, and can commit a checkpoint
    shardings = sharded.param_shardings(p.config, mesh, rules)
    metadata = {"source": os.path.abspath(hf_dir), "converter": __name__,
                "model_type": p.hf.get("model_type")}
    lead = jax.process_index() == 0
    group: dict = {}
    nbytes = 0
    for leaf in p.leaves:
        dtype = leaf_dtype(p, leaf)
        size = math.prod(leaf.shape) * np.dtype(dtype).itemsize
        if group and nbytes + size > group_bytes:      # a big leaf goes alone
            _save_group(step_dir, group, metadata)
            group, nbytes = {}, 0
        value = device_leaf(p.folder, leaf, dtype=dtype, block=p.block,
                            sharding=leaf_sharding(shardings, leaf), chunk_bytes=chunk_bytes)
        set_path(group, (leaf.collection, *leaf.path), value)
        nbytes += size
    if group:
        _save_group(step_dir, group, metadata)
    from orbax.checkpoint.experimental.v1 import partial
    partial.finalize(step_dir)
    if lead:
        save_model_config(out_dir, p.config)
        shutil.copyfile(os.path.join(hf_dir, "config.json"),
                        os.path.join(out_dir, "hf_config.json"))
    return p.config


def restore_converted(out_dir: str, mesh=None, rules=None, step: int = 0
                      ) -> tuple[ModelConfig, dict]:
    """(config, {"params", "routing"?}) of a converted checkpoint, onto `mesh` with `rules`.

    Without a mesh every array lands whole on the first device.
    """
    import flax
    import orbax.checkpoint as ocp
    from deepseek_jax.train.workdir import resolve
    out_dir = resolve(out_dir)                  # Orbax reads absolute paths only
    config = load_model_config(out_dir)
    shapes = flax.core.meta.unbox(sharded.abstract_variables(config))
    shapes = {k: v for k, v in shapes.items() if k in ("params", "routing")}
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    else:
        sharded.validate(config, mesh, rules)
        shardings = sharded.param_shardings(config, mesh, rules)
        shardings = {k: shardings[k] for k in shapes}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, shardings)
    manager = ocp.CheckpointManager(os.path.join(out_dir, "checkpoints"), item_names=("state",))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        manager.close()
    return config, {k: restored[k] for k in abstract if restored.get(k)}


def train_state_from_converted(out_dir: str, config: ModelConfig, tx, mesh, rules):
    """A TrainState at step 0 with the converted parameters and fresh optimizer state, sharded.

    `config` must describe the same parameters as the converted one (shapes are checked);
    numerics fields (dtype, remat, fp8, moe_impl) may differ.
    """
    from deepseek_jax import parallel
    from deepseek_jax.train.step import TrainState
    saved, variables = restore_converted(out_dir, mesh, rules)
    want = sharded.abstract_variables(config)
    got = sharded.abstract_variables(saved)
    if jax.tree.map(lambda x: x.shape, want) != jax.tree.map(lambda x: x.shape, got):
        raise ValueError(f"{out_dir} was converted for a model with different parameter shapes "
                         f"than this run's model config; compare {MODEL_CONFIG} with it")
    shardings = sharded.state_shardings(config, mesh, rules, tx)
    params = jax.tree.map(lambda x: x.astype(config.param_dtype), variables["params"])
    with parallel.sharding_context(mesh, rules):
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state,
                      routing=variables.get("routing", {}))


# --- command line -------------------------------------------------------------------------------

def parse_mesh(text: str | None) -> dict[str, int] | None:
    """'fsdp=8,tensor=1' → {"fsdp": 8, "tensor": 1}; empty → None (the preset's default)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if not size:
            raise SystemExit(f"--mesh: expected axis=size pairs like fsdp=8, got {part!r}")
        out[axis.strip()] = int(size)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m deepseek_jax.hf.convert",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True, help="Hugging Face checkpoint folder or hub id "
                    "(org/name, downloaded into the Hugging Face cache)")
    ap.add_argument("--revision", default=None, help="branch, tag or commit of a hub id")
    ap.add_argument("--out", required=True, help="output folder (new)")
    ap.add_argument("--preset", default="fsdp", help="parallelism preset (deepseek_jax.parallel)")
    ap.add_argument("--mesh", default="", help="mesh sizes, e.g. fsdp=8 or fsdp=-1,tensor=4")
    ap.add_argument("--dtype", default="bfloat16", help="parameter storage dtype")
    ap.add_argument("--chunk_mb", type=int, default=DEFAULT_CHUNK_BYTES >> 20,
                    help="host memory budget of one read, MiB (peak host ≈ 6× this)")
    ap.add_argument("--group_mb", type=int, default=DEFAULT_GROUP_BYTES >> 20,
                    help="MiB (global) built on the devices before each partial save")
    args = ap.parse_args(argv)
    from deepseek_jax import parallel
    from deepseek_jax.train import workdir as run_dir
    from deepseek_jax.hf.hub import checkpoint_folder
    args.hf = run_dir.resolve(checkpoint_folder(args.hf, revision=args.revision))  # at start-up
    args.out = run_dir.resolve(args.out)
    parallel.maybe_initialize_distributed()
    config = convert_to_orbax(args.hf, args.out, preset=args.preset,
                              mesh_config=parse_mesh(args.mesh), dtype=jnp.dtype(args.dtype),
                              chunk_bytes=args.chunk_mb << 20,
                              group_bytes=args.group_mb << 20)
    if jax.process_index() == 0:
        print(f"wrote {args.out}/checkpoints/0 ({config.n_layers} layers, "
              f"mtp_depth={config.mtp_depth}, {jnp.dtype(config.param_dtype).name})")


if __name__ == "__main__":
    main()
