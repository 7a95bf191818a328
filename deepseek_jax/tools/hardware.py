"""The hardware table the planner's analytic model reads: one `Chip` per accelerator.

Every number carries its source in a comment. Conventions:

Per chip, except where a chip is several JAX devices (TPU7x: each of its two TensorCores is a
device): there every per-chip number below is per device, the planner's unit.

  peak_flops   dense bf16 FLOP/s per chip (no sparsity), from the one peak table
               (`train.flops.PEAK_BF16_FLOPS`, which MFU reads too)
  hbm_bytes    memory a program may use per chip. For TPUs this is what the compiler itself
               reports as available in its out-of-memory message (libtpu 0.0.48.1, ahead-of-time
               compile from a CPU host), which is a little below the marketing capacity;
               for GPUs the data-sheet capacity.
  hbm_bw       HBM bytes/s per chip
  ici_link_bw  TPU: one-way bytes/s of one ICI link; a mesh axis laid along one torus dimension
               gets 2 × this (a bidirectional ring), and × k when it spans k dimensions.
  ici_dims     TPU torus dimensions (v5p, TPU7x 3-D; v5e, v6e 2-D)
  devices_per_chip  JAX devices per chip (2 on TPU7x: its TensorCores); the devices of one
               chip are neighbours in the device mesh, joined by the die-to-die link
  die_bw       one-way bytes/s between the devices of one chip
  dcn_bw       bytes/s per chip across the data-centre network (multi-slice)
  nvlink_bw    GPU: one-way NVLink bytes/s per GPU inside a node
  node_bw      GPU: one-way scale-out bytes/s per GPU across nodes (InfiniBand NIC share)
  gpus_per_node

Left out: TPU v4 (its compile-only topology exposes each TensorCore as a device; it could be
listed as TPU7x is), fp8/int8 peaks (the planner models bf16 training), and
latency terms (the model is bandwidth-only; at pod scale the arrays are large).
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.train.flops import PEAK_BF16_FLOPS

GiB = 2 ** 30
MiB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    kind: str                    # "tpu", "gpu" or "cpu"
    peak_flops: float
    hbm_bytes: float
    hbm_bw: float
    ici_link_bw: float = 0.0
    ici_dims: int = 0
    dcn_bw: float = 0.0
    nvlink_bw: float = 0.0
    node_bw: float = 0.0
    gpus_per_node: int = 0
    topology_prefix: str = ""    # jax.experimental.topologies name, e.g. "v5p"
    cores_per_chip: int = 1      # TensorCores counted by the Cloud TPU accelerator-type suffix
    max_slice_chips: int = 0     # largest single slice (ICI domain)
    devices_per_chip: int = 1
    die_bw: float = 0.0


CHIPS = {
    "v5p": Chip(
        "TPU v5p", "tpu",
        peak_flops=PEAK_BF16_FLOPS["tpu v5p"],
        # "available HBM (95.73G)" in the libtpu 0.0.48.1 OOM message for topology v5p:2x2x1;
        # the data sheet says 95 GB HBM2e (cloud.google.com/tpu/docs/v5p).
        hbm_bytes=95.73 * GiB,
        # 2,765 GB/s: cloud.google.com/tpu/docs/v5p ("HBM bandwidth per chip 2765 GBps").
        hbm_bw=2.765e12,
        # 9.0e10 B/s one-way per link (1.8e11 bidirectional): scaling book chip table (tpus.md).
        ici_link_bw=9.0e10, ici_dims=3,
        # 6.25e9 B/s per chip: scaling book, tpus.md ("DCN ... 6.25e9 bytes/s per TPU").
        dcn_bw=6.25e9,
        topology_prefix="v5p",
        # v5p-N counts TensorCores, 2 per chip: cloud.google.com/tpu/docs/v5p (v5p-8 = 4 chips).
        cores_per_chip=2,
        # 8,960 chips per pod: cloud.google.com/tpu/docs/v5p ("chips per pod 8960").
        max_slice_chips=8960),
    "tpu7x": Chip(
        "TPU7x (Ironwood), per TensorCore", "tpu",
        peak_flops=PEAK_BF16_FLOPS["tpu7x"],
        # "available HBM (94.74G)" in libtpu's OOM message for one device of topology
        # tpu7x:2x2x1 (192 GiB per chip, cloud.google.com/tpu/docs/tpu7x, over two devices).
        hbm_bytes=94.74 * GiB,
        # 7,380 GB/s per chip (cloud.google.com/tpu/docs/tpu7x), shared by its two devices.
        hbm_bw=7.38e12 / 2,
        # 1,200 GB/s bidirectional ICI per chip, as v5p (cloud.google.com/tpu/docs/tpu7x); per
        # link, the scaling book's v7 row (9.0e10 one way). The chip's two devices share its
        # links: `cost_model.axis_bandwidth` halves a torus ring's rate per device.
        ici_link_bw=9.0e10, ici_dims=3,
        # 100 Gb/s DCN per chip (cloud.google.com/tpu/docs/tpu7x), per device half.
        dcn_bw=1.25e10 / 2,
        topology_prefix="tpu7x",
        # tpu7x-N counts TensorCores, 2 per chip (tpu7x-8 = 2x2x1 = 4 chips); 9,216 chips per pod.
        cores_per_chip=2, max_slice_chips=9216, devices_per_chip=2,
        # The die-to-die link is "6x faster than 1D ICI link" (MaxText's custom-model
        # optimization guide); no data-sheet figure.
        die_bw=6 * 9.0e10),
    "v5e": Chip(
        "TPU v5e", "tpu",
        peak_flops=PEAK_BF16_FLOPS["tpu v5e"],
        # "available HBM (15.75G)" in the libtpu 0.0.48.1 OOM message for v5e:2x2 (16 GB chip).
        hbm_bytes=15.75 * GiB,
        # 819 GB/s: cloud.google.com/tpu/docs/v5e ("HBM2 ... 819 GBps").
        hbm_bw=8.19e11,
        # 4.5e10 B/s one-way per link: scaling book chip table (tpus.md).
        ici_link_bw=4.5e10, ici_dims=2,
        # 3.125e9 B/s per chip: scaling book, tpus.md (DCN per TPU on v5e).
        dcn_bw=3.125e9,
        topology_prefix="v5e", cores_per_chip=1,
        # 256 chips per pod (16x16): cloud.google.com/tpu/docs/v5e.
        max_slice_chips=256),
    "v6e": Chip(
        "TPU v6e", "tpu",
        peak_flops=PEAK_BF16_FLOPS["tpu v6e"],
        # "available HBM (31.24G)" in the libtpu 0.0.48.1 OOM message for v6e:2x2 (32 GB chip).
        hbm_bytes=31.24 * GiB,
        # 1,640 GB/s: cloud.google.com/tpu/docs/v6e ("HBM bandwidth per chip 1640 GBps").
        hbm_bw=1.64e12,
        # 9.0e10 B/s one-way per link: scaling book chip table (tpus.md).
        ici_link_bw=9.0e10, ici_dims=2,
        # 1.25e10 B/s per chip: scaling book, tpus.md (DCN on v6e).
        dcn_bw=1.25e10,
        topology_prefix="v6e", cores_per_chip=1,
        # 256 chips per pod (16x16): cloud.google.com/tpu/docs/v6e.
        max_slice_chips=256),
    "h100": Chip(
        "NVIDIA H100 SXM", "gpu",
        peak_flops=PEAK_BF16_FLOPS["h100"],
        # 80 GB HBM3 (NVIDIA H100 data sheet, SXM5): nvidia-smi reports 81,559 MiB on the
        # H100 lent to this project; 3.35 TB/s (data sheet).
        hbm_bytes=81_559 * MiB, hbm_bw=3.35e12,
        # NVLink 4: 900 GB/s bidirectional per GPU = 450 GB/s one way (H100 data sheet;
        # scaling book gpus.md: 18 links x 25 GB/s).
        nvlink_bw=4.5e11,
        # 8 x 400 Gb/s ConnectX-7 per DGX H100 node = 50 GB/s per GPU one way (scaling book
        # gpus.md: "400 GB/s node egress"; NVIDIA DGX H100 user guide).
        node_bw=5.0e10, gpus_per_node=8),
    "h200": Chip(
        "NVIDIA H200 SXM", "gpu",
        # 141 GB HBM3e (NVIDIA H200 data sheet): nvidia-smi reports 143,771 MiB on the H200
        # lent to this project; 4.8 TB/s (data sheet).
        peak_flops=PEAK_BF16_FLOPS["h200"], hbm_bytes=143_771 * MiB, hbm_bw=4.8e12,
        # NVLink 4, 900 GB/s bidirectional per GPU (H200 data sheet).
        nvlink_bw=4.5e11,
        # 8 x 400 Gb/s NICs per 8-GPU node, as DGX H100/H200 (NVIDIA DGX H200 data sheet).
        node_bw=5.0e10, gpus_per_node=8),
    "a100": Chip(
        "NVIDIA A100 SXM 80GB", "gpu",
        # 80 GB HBM2e, 2,039 GB/s: NVIDIA A100 data sheet.
        peak_flops=PEAK_BF16_FLOPS["a100"], hbm_bytes=80e9, hbm_bw=2.039e12,
        # NVLink 3: 600 GB/s bidirectional per GPU (A100 data sheet).
        nvlink_bw=3.0e11,
        # 8 x 200 Gb/s HDR NICs per DGX A100 = 25 GB/s per GPU (NVIDIA DGX A100 user guide).
        node_bw=2.5e10, gpus_per_node=8),
    "cpu": Chip(
        "host CPU (fake devices)", "cpu",
        # One x86 core with AVX2 FMA: 2 FMA ports x 8 fp32 lanes x 2 FLOPs x ~3 GHz ≈ 1e11
        # FLOP/s. Fake devices share the host's cores; this sets a scale for ranking only.
        peak_flops=1.0e11,
        # Memory per fake device: set from the host at run time (targets.py divides the host's
        # physical memory by the device count); this default is used only when unknown.
        hbm_bytes=1 * GiB,
        # ~10 GB/s: single-core streaming copy bandwidth on a DDR4 server (STREAM "Copy"
        # order of magnitude); collectives between fake devices are memory copies.
        hbm_bw=1.0e10, ici_link_bw=1.0e10, ici_dims=1, dcn_bw=1.0e10),
}


def get_chip(name: str) -> Chip:
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[name]
