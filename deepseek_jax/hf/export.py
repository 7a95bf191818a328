"""Export a run's checkpoint as a Hugging Face DeepSeek-V2/V3 folder, streaming tensor by tensor.

  python -m deepseek_jax.hf.export --run=DIR --out=HF_DIR [--fp8] [--dtype=bfloat16] \
      [--tokenizer=PATH] [--overwrite]

DIR is a training run's directory (model_config.json + checkpoints/, the latest step unless
--step) or a converted checkpoint (`hf.convert`). HF_DIR gets:

  config.json                      `hf_config.to_hf_config`: model_type deepseek_v3 (or
                                   deepseek_v2 for softmax routing), architectures, torch_dtype,
                                   num_nextn_predict_layers; with --fp8 the quantization_config
                                   DeepSeek-V3 ships (e4m3, dynamic activations, 128×128)
  model-0000i-of-0000N.safetensors the tensors under the names the importer reads
                                   (`mapping.plan`, read backwards: `tensor_groups`, `hf_index`),
                                   files of at most --shard_mb, as save_pretrained splits
  model.safetensors.index.json     weight_map and total_size
  tokenizer files                  when the run used an HF tokenizer (below)

Tensors: the parameters in the checkpoint's storage dtype, or --dtype; the V3 selection bias
(`e_score_correction_bias`) in fp32 whatever --dtype says, as the model keeps it. MTP module k
is `model.layers.{n_layers + k}` with enorm, hnorm, eh_proj, shared_head.norm, its decoder
layer, and copies of the embedding and output head (`embed_tokens`, `shared_head.head`) as
DeepSeek-V3 ships them (`mapping.mtp_copies`).

fp8 (--fp8): every linear weight of a decoder layer (attention projections, dense, shared and
routed expert FFNs, the MTP module's layer included) is quantized from the checkpoint's values
in fp32 by `kernels.fp8.quantize_weight` — e4m3 codes plus one fp32 multiplier per 128×128
block (`weight_scale_inv`, scale = max(amax, 1e-4)/448) — the format `load_hf_checkpoint`
dequantizes. The router, norms, embedding, output head, eh_proj and the bias stay in the
export dtype (fp32 for the bias), as in DeepSeek-V3's files.

Streaming: the tensors are written in the order of the plan; for each HF tensor stack (e.g.
q_b_proj of every scanned layer) the leaves that fill it are restored from the Orbax checkpoint
alone (a partial restore), sharded over a mesh of this process's devices (--preset, --mesh;
default fsdp over all). Each HF tensor — one layer's, one expert's — is then assembled on the
host from the device shards that hold it (`gather_position`: a dynamic slice of each such shard,
copied out; nothing is resharded, so no device holds more than its own shard), written into its
safetensors file and dropped. Host memory: about two HF tensors (our slice and the HF layout,
plus the fp32 copy and e4m3 codes with --fp8), never a whole stack; devices: the leaves of one
stack, spread over the mesh as in training.

Tokenizer: --tokenizer=PATH, the run's `data.tokenizer` (a tokenizer.json under any name,
copied as tokenizer.json) or a folder; the files of `hub.TOKENIZER_FILES` found next to it
(tokenizer_config.json with its chat template, special_tokens_map.json, …) are copied too.
Without it, a converted checkpoint's files come from the folder it was converted from
(recorded in its checkpoint metadata). A training run does not record its data config, so a run trained with the byte
tokenizer — or whose tokenizer is not given — is exported without tokenizer files (said once).

An export into a non-empty HF_DIR is refused unless --overwrite, which first deletes the files
an export writes (config.json, model-*.safetensors, the index, tokenizer files) and nothing
else.

Left out: multi-process (pod) exports — one process gathers every tensor, so the run's
checkpoint must be readable from one host (refused under multi-process JAX); and routing that
transformers' DeepSeek classes do not have (sigmoid without the selection bias, softmax with
top-2-sum groups: `to_hf_config` refuses those with the reason).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.hf import mapping
from deepseek_jax.kernels.fp8 import quantize_weight
from deepseek_jax.hf.fp8_blocks import scale_name
from deepseek_jax.hf.hf_config import CONFIG_FILE, HFCheckpointError, to_hf_config
from deepseek_jax.hf.hub import TOKENIZER_FILES
from deepseek_jax.hf.loader import leaf_sharding, set_path
from deepseek_jax.hf.safetensors_io import INDEX_FILE
from deepseek_jax.hf.writer import ShardedWriter
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import adapters
from deepseek_jax.train import sharded

DEFAULT_SHARD_BYTES = 5 * 2**30
FP8_BLOCK = 128


class ExportError(ValueError):
    """An export that cannot run; the message names the flag or file and the fix."""


# --- the output folder --------------------------------------------------------------------------

def _written_files(out: str) -> list[str]:
    """Files of `out` that an export writes (and --overwrite deletes)."""
    names = [CONFIG_FILE, INDEX_FILE, *TOKENIZER_FILES]
    found = [os.path.join(out, n) for n in names if os.path.exists(os.path.join(out, n))]
    return found + sorted(glob.glob(os.path.join(out, "model-*-of-*.safetensors")))


def check_out(out: str, overwrite: bool) -> None:
    """Refuses a file, or a non-empty folder unless `overwrite`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out={out} is a file; pass a folder")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise ExportError(f"--out={out} is not empty ({len(entries)} entries, e.g. "
                          f"{entries[0]!r}); export into a new or empty folder, or pass "
                          "--overwrite to replace a previous export there")


def prepare_out(out: str) -> None:
    """Creates `out` and deletes what a previous export wrote there (nothing else)."""
    if os.path.isdir(out):
        for fn in _written_files(out):
            os.remove(fn)
    os.makedirs(out, exist_ok=True)


# --- the run's checkpoint -----------------------------------------------------------------------

def checkpoint_step(run: str, step: int | None) -> tuple[int, str]:
    """(step, its directory): the latest step of RUN/checkpoints unless `step` is given."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(run, "checkpoints"))
    steps = manager.all_steps()
    manager.close()
    if not steps:
        raise ExportError(f"no checkpoint under {run}/checkpoints: --run must be a training "
                          "run's directory or a converted checkpoint")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ExportError(f"--step={step}: {run} has checkpoints at steps {sorted(steps)}")
    return step, os.path.join(run, "checkpoints", str(step))


@dataclasses.dataclass(frozen=True)
class Source:
    """Where an exported run's leaves come from: its checkpoint (`state_dir`; `meta`, its leaf
    metadata, read once: a V3 export has hundreds of groups; `dtypes`, each leaf's dtype as the
    run computes with it) and, for a LoRA run whose checkpoints hold adapters only, the run it
    started from (`base`), whose weights it froze in its own `param_dtype`."""
    state_dir: str
    config: ModelConfig
    meta: Mapping
    dtypes: Mapping[str, np.dtype]
    base: "Source | None"


def run_source(run: str, step: int | None) -> Source:
    """The `Source` of RUN's checkpoint at `step` (default: the latest), its starting run's
    followed back while checkpoints hold adapters only."""
    import orbax.checkpoint as ocp
    from deepseek_jax.train.checkpoint import holds_frozen, load_model_config, load_start
    config = load_model_config(run)
    _, step_dir = checkpoint_step(run, step)
    state_dir = os.path.join(step_dir, "state")
    meta = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
    base = None
    if config.adapter_rank and not holds_frozen(meta["params"]):
        start = load_start(run)
        if start is None:
            raise ExportError(f"{run}'s checkpoints hold LoRA adapters only and its start.json, "
                              "which names the run with the frozen weights, is missing")
        try:
            base = run_source(*start)
        except ExportError as e:
            raise ExportError(f"{run} holds LoRA adapters only; its frozen weights are "
                              f"{start[0]} at step {start[1]}, which cannot be read: {e}") from e
    return Source(state_dir, config, meta, stored_dtypes(meta, config, state_dir, base), base)


def stored_dtypes(meta: Mapping, config: ModelConfig, state_dir: str,
                  base: Source | None = None) -> dict[str, np.dtype]:
    """{leaf key: dtype} from the checkpoint's metadata (the parameters of a run with a `base`:
    its `param_dtype`); shapes checked against the plan."""
    out = {}
    for leaf in mapping.plan(config)[0]:
        if base is not None and leaf.collection == "params":
            out[leaf.key] = np.dtype(config.param_dtype)      # the base's shapes are checked
            continue
        m = meta
        try:
            for k in (leaf.collection, *leaf.path):
                m = m[k]
        except (KeyError, TypeError):
            raise ExportError(f"{state_dir} has no {leaf.key}, which model_config.json's model "
                              "has; is it this run's checkpoint?") from None
        if tuple(m.shape) != leaf.shape:
            raise ExportError(f"{state_dir}: {leaf.key} has shape {list(m.shape)}, "
                              f"model_config.json's model {list(leaf.shape)}")
        out[leaf.key] = np.dtype(m.dtype)
    return out


def read_group(src: Source, leaves: Sequence[mapping.Leaf], shardings: Mapping) -> dict:
    """{leaf key: array} of `leaves` as `src`'s run computes with them: restored from its
    checkpoint, or (its frozen parameters) read from its base and cast, then each adapted
    weight replaced by W + s·A·B."""
    own = [leaf for leaf in leaves if src.base is None or leaf.collection != "params"]
    arrays = restore_leaves(src.state_dir, own, shardings, src.dtypes) if own else {}
    frozen = [leaf for leaf in leaves if src.base is not None and leaf.collection == "params"]
    if frozen:
        for key, value in read_group(src.base, frozen, shardings).items():
            arrays[key] = value.astype(src.dtypes[key])
            if arrays[key] is not value:
                value.delete()
    if src.config.adapter_rank:
        arrays = _merge_adapters(src.state_dir, src.meta, leaves, arrays, shardings, src.config)
    return arrays


def restore_leaves(state_dir: str, leaves: Sequence[mapping.Leaf], shardings: Mapping,
                   dtypes: Mapping[str, np.dtype]) -> dict[str, jax.Array]:
    """{leaf key: array} of just these leaves, restored with their shardings."""
    import orbax.checkpoint as ocp
    abstract: dict = {}
    for leaf in leaves:
        set_path(abstract, (leaf.collection, *leaf.path), jax.ShapeDtypeStruct(
            leaf.shape, dtypes[leaf.key], sharding=leaf_sharding(shardings, leaf)))
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
    out = {}
    for leaf in leaves:
        value = restored
        for k in (leaf.collection, *leaf.path):
            value = value[k]
        out[leaf.key] = value
    return out


def _merge_adapters(state_dir: str, meta: Mapping | None, leaves: Sequence[mapping.Leaf],
                    arrays: dict, shardings: Mapping, config: ModelConfig) -> dict:
    """`arrays` with each weight that a run trained with LoRA adapters adapted replaced by
    W + s·A·B (`model.adapters`): such a run exports as the plain model it computes. `meta`:
    the checkpoint's leaf metadata (None for a run without adapters)."""
    if meta is None:
        return arrays
    import orbax.checkpoint as ocp
    at = lambda tree, keys: functools.reduce(lambda node, k: node[k], keys, tree)  # noqa: E731
    abstract: dict = {}

    def has_adapter(leaf) -> bool:           # an adapters-only checkpoint lacks whole modules
        try:
            return leaf.path[-1] + adapters.SUFFIXES[0] in at(meta["params"], leaf.path[:-1])
        except (KeyError, TypeError):
            return False

    adapted = [leaf for leaf in leaves if leaf.collection == "params" and has_adapter(leaf)]
    for leaf in adapted:
        for suffix in adapters.SUFFIXES:
            path = ("params", *leaf.path[:-1], leaf.path[-1] + suffix)
            m = at(meta, path)
            set_path(abstract, path, jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                          sharding=at(shardings, path)))
    if not adapted:
        return arrays
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
    out = dict(arrays)
    for leaf in adapted:
        a, b = (at(restored, ("params", *leaf.path[:-1], leaf.path[-1] + suffix))
                for suffix in adapters.SUFFIXES)
        out[leaf.key] = _merged_weight(arrays[leaf.key], a, b, config)
    return out


_merged_weight = jax.jit(adapters.merged_weight, static_argnums=3)


# --- the tensors --------------------------------------------------------------------------------

def fp8_names(config: ModelConfig) -> set[str]:
    """HF names of the linear weights --fp8 quantizes (every decoder layer's; not eh_proj)."""
    raw = mapping.plan(config)[1]
    return {n for r in raw if r.path[-1] != "eh_proj" for n in r.names.flat}


def _out_dtype(leaf: mapping.Leaf, dtype) -> np.dtype:
    return np.dtype(np.float32) if leaf.collection == "routing" else np.dtype(dtype)


def tensor_specs(config: ModelConfig, dtype, quantized: set[str], block: int
                 ) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor the export writes, in writing order."""
    copies = _copies(config)
    specs = []
    for g in mapping.tensor_groups(mapping.plan(config)[0]):
        dt = _out_dtype(g.leaves[0], dtype)
        for name in g.names.flat:
            if name in quantized:
                rows, cols = g.hf_shape
                specs.append((name, np.dtype(jnp.float8_e4m3fn), g.hf_shape))
                specs.append((scale_name(name), np.dtype(np.float32),
                              (-(-rows // block), -(-cols // block))))
            else:
                specs.append((name, dt, g.hf_shape))
            specs += [(c, dt, g.hf_shape) for c in copies.get(name, [])]
    return specs


def _copies(config: ModelConfig) -> dict[str, list[str]]:
    """{HF name of the main embedding / head: names of its MTP copies}."""
    main = {("embed",): "model.embed_tokens.weight", ("lm_head",): "lm_head.weight"}
    out: dict[str, list[str]] = {}
    for name, path in mapping.mtp_copies(config):
        out.setdefault(main[path], []).append(name)
    return out


def _scatter_plan(group: mapping.TensorGroup) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    """(leaf key, HF index) of each leaf of the group; every HF element written exactly once."""
    count = np.zeros(group.hf_shape, np.int32)
    plan = []
    for leaf in group.leaves:
        idx = mapping.hf_index(leaf.layout)
        np.add.at(count, idx, 1)
        plan.append((leaf.key, idx))
    if not np.all(count == 1):
        raise AssertionError(f"the plan does not cover {group.names.flat[0]} exactly once")
    return plan


@functools.partial(jax.jit, static_argnums=2)
def _pick(x, starts, n: int):
    """x[starts] over the first n axes (traced starts: one compile per shard shape)."""
    full = jnp.concatenate([starts, jnp.zeros((x.ndim - n,), jnp.int32)])
    return jax.lax.dynamic_slice(x, full, (1,) * n + x.shape[n:]).reshape(x.shape[n:])


def gather_position(x: jax.Array, pos: tuple[int, ...]) -> np.ndarray:
    """x[pos] (pos over the leading stacked axes) on the host, from the addressable shards that
    hold it, each distinct shard once: no device ever holds more than its own shard."""
    n = len(pos)
    out = np.empty(x.shape[n:], x.dtype)
    seen = set()
    for shard in x.addressable_shards:
        index = tuple(slice(*s.indices(d)[:2]) for s, d in zip(shard.index, x.shape))
        key = tuple((s.start, s.stop) for s in index)
        if key in seen or not all(s.start <= p < s.stop for s, p in zip(index, pos)):
            continue
        seen.add(key)
        local = np.asarray([p - s.start for s, p in zip(index, pos)], np.int32)
        out[index[n:]] = np.asarray(jax.device_get(_pick(shard.data, local, n)))
    return out


def hf_tensors(group: mapping.TensorGroup, arrays: Mapping[str, jax.Array], dtype):
    """Yields (name, HF tensor) for each tensor of the stack, gathered one at a time."""
    plan = _scatter_plan(group)
    for pos in np.ndindex(group.names.shape):
        out = np.empty(group.hf_shape, dtype)
        for key, idx in plan:
            out[idx] = gather_position(arrays[key], pos)
        yield group.names[pos], out


_quantize = jax.jit(quantize_weight, static_argnames=("block", "scale_fmt"))


def _write_tensor(writer: ShardedWriter, name: str, value: np.ndarray, dtype,
                  quantized: set[str], block: int, copies: Sequence[str]) -> None:
    if name in quantized:
        w_q, scale = jax.device_get(_quantize(jnp.asarray(value, jnp.float32), block=block))
        writer.write(name, np.asarray(w_q))
        writer.write(scale_name(name), np.asarray(scale, np.float32))
        return
    value = value.astype(dtype)
    writer.write(name, value)
    for c in copies:
        writer.write(c, value)


# --- the export ---------------------------------------------------------------------------------

def export_run(run: str, out: str, *, fp8: bool = False, dtype: Any = None,
               overwrite: bool = False, step: int | None = None, tokenizer: str | None = None,
               preset: str = "fsdp", mesh_config: Mapping[str, int] | None = None,
               devices: Sequence | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               fp8_block: int = FP8_BLOCK) -> dict:
    """Writes the HF folder `out` from run `run` (see the module docstring); returns config.json.

    Args:
      run: a training run's directory or a converted checkpoint.
      out: the output folder (new or empty unless overwrite).
      fp8: quantize the decoder layers' linear weights to block fp8 (fp8_block × fp8_block).
      dtype: dtype of the unquantized tensors; default: the checkpoint's parameter dtype.
      step: the checkpoint step (default: the latest).
      tokenizer: a tokenizer.json or a folder of tokenizer files to copy.
      preset, mesh_config, devices: the mesh the leaves are restored onto.
      max_shard_bytes: the largest safetensors file (a larger tensor gets one of its own).
    """
    from deepseek_jax import parallel
    from deepseek_jax.train.checkpoint import load_model_config
    from deepseek_jax.train.workdir import resolve
    if jax.process_count() > 1:
        raise ExportError("export runs in one process (it gathers every tensor to this host); "
                          "start it without multi-process JAX")
    run, out = resolve(run), resolve(out)
    check_out(out, overwrite)
    config = load_model_config(run)
    src = run_source(run, step)
    step_dir = os.path.dirname(src.state_dir)
    dtype = np.dtype(dtype or src.dtypes["params/embed"])
    hf = to_hf_config(config, torch_dtype=dtype, fp8_block=fp8_block if fp8 else None)
    tok_files = tokenizer_files(run, step_dir, tokenizer)
    mesh, rules = parallel.mesh_and_rules(preset, mesh_config, devices)
    sharded.validate(config, mesh, rules)
    prepare_out(out)
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2)
    _write_weights(out, src, dtype, fp8, fp8_block, max_shard_bytes,
                   sharded.param_shardings(config, mesh, rules))
    for src, name in tok_files:
        shutil.copyfile(src, os.path.join(out, name))
    return hf


def _write_weights(out, src: Source, dtype, fp8, block, max_shard_bytes, shardings) -> None:
    config = src.config
    quantized = fp8_names(config) if fp8 else set()
    copies = _copies(config)
    writer = ShardedWriter(out, tensor_specs(config, dtype, quantized, block), max_shard_bytes)
    for group in mapping.tensor_groups(mapping.plan(config)[0]):
        arrays = read_group(src, group.leaves, shardings)
        dt = _out_dtype(group.leaves[0], dtype)
        for name, value in hf_tensors(group, arrays, src.dtypes[group.leaves[0].key]):
            _write_tensor(writer, name, value, dt, quantized, block, copies.get(name, []))
        for a in arrays.values():
            a.delete()
    writer.close()


# --- tokenizer ----------------------------------------------------------------------------------

def tokenizer_files(run: str, step_dir: str, tokenizer: str | None) -> list[tuple[str, str]]:
    """(source, name in HF_DIR) of the tokenizer files: --tokenizer (a file is copied as
    tokenizer.json, with the TOKENIZER_FILES next to it) or a folder; else a converted
    checkpoint's source folder."""
    pairs: list[tuple[str, str]] = []
    folder = _converted_source(step_dir)
    if tokenizer:
        if not os.path.exists(tokenizer):
            raise ExportError(f"--tokenizer={tokenizer} does not exist; pass the run's "
                              "data.tokenizer (a tokenizer.json) or a folder of tokenizer files")
        folder = tokenizer
        if os.path.isfile(tokenizer):
            folder = os.path.dirname(tokenizer)
            pairs.append((tokenizer, "tokenizer.json"))
    pairs += [(os.path.join(folder, n), n) for n in TOKENIZER_FILES
              if folder and os.path.isfile(os.path.join(folder, n))
              and n not in {name for _, name in pairs}]
    if tokenizer and not pairs:
        raise ExportError(f"--tokenizer={tokenizer}: no tokenizer files there (looked for "
                          f"{', '.join(TOKENIZER_FILES)})")
    if not pairs:
        print(f"{run}: no HF tokenizer recorded; exporting without tokenizer files (pass "
              "--tokenizer=PATH if the run used one)", flush=True)
    return pairs


def _converted_source(step_dir: str) -> str | None:
    """The HF folder a converted checkpoint came from (its checkpoint metadata), if it exists."""
    fn = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    if not os.path.exists(fn):
        return None
    with open(fn) as f:
        source = (json.load(f).get("custom_metadata") or {}).get("source")
    return source if source and os.path.isdir(source) else None


# --- command line -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    from deepseek_jax.hf.convert import parse_mesh
    ap = argparse.ArgumentParser(prog="python -m deepseek_jax.hf.export",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="training run or converted checkpoint folder")
    ap.add_argument("--out", required=True, help="Hugging Face folder to write (new or empty)")
    ap.add_argument("--fp8", action="store_true", help="block-fp8 e4m3 linear weights (V3)")
    ap.add_argument("--dtype", default="", help="dtype of the other tensors (default: stored)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--tokenizer", default="", help="tokenizer.json or folder to copy")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    ap.add_argument("--preset", default="fsdp", help="parallelism preset of the restore mesh")
    ap.add_argument("--mesh", default="", help="mesh sizes, e.g. fsdp=8")
    ap.add_argument("--shard_mb", type=int, default=DEFAULT_SHARD_BYTES >> 20,
                    help="largest safetensors file, MiB")
    args = ap.parse_args(argv)
    try:
        hf = export_run(args.run, args.out, fp8=args.fp8, dtype=args.dtype or None,
                        overwrite=args.overwrite, step=args.step,
                        tokenizer=args.tokenizer or None, preset=args.preset,
                        mesh_config=parse_mesh(args.mesh), max_shard_bytes=args.shard_mb << 20)
    except (ExportError, HFCheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    with open(os.path.join(args.out, INDEX_FILE)) as f:
        n = len(set(json.load(f)["weight_map"].values()))
    print(f"wrote {args.out}: {hf['model_type']}, {n} safetensors file(s), "
          f"{hf['torch_dtype']}{' + fp8 e4m3' if args.fp8 else ''}")


if __name__ == "__main__":
    main()
