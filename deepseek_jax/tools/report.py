"""The planner's outputs: a terminal table, Markdown, CSV and a PNG chart of the ranked rows.

Rows are the dicts `plan.build_row` makes (bytes per chip, seconds per step). Columns:

  rank, strategy, source      compiled (tpu | cpu) or analytic
  params, opt, act+temp       GiB per chip; act+temp = everything the compiler allocates beyond
                              parameters and optimizer state (activations, gradients, buffers)
  total / HBM, fits           GiB per chip against the chip's usable HBM
  model              the analytic model's total, for comparison with the compiler's
  TFLOP              model FLOPs per chip per step, from the config
  AG, RS, AR, A2A, CP  collective GiB per chip per step (HLO when compiled, else analytic), by
                     role (`hlo.Collective.role`): a TPU windowed einsum's permutes count as the
                     gathers or reduce-scatters they carry; CP is every other permute
  compute, comm, step, MFU    analytic times from the hardware table
  compile, host RSS  seconds to lower + compile one strategy, and the compile's peak host memory

Below the table: notes per row (mesh layout on the torus, failed compiles, ...) and, for each
compiled row, its largest buffers and the largest of those live together at the memory peak
(`buffers.py`): size, shape, parameter/output/temp and the op.
"""

from __future__ import annotations

import csv
import math
import os

GiB = 2 ** 30
_KINDS = (("AG", "all-gather"), ("RS", "reduce-scatter"), ("AR", "all-reduce"),
          ("A2A", "all-to-all"), ("CP", "collective-permute"))


def _g(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / GiB:.1f}"


def _f(x: float, fmt: str = "{:.2f}") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _comm(row: dict, kind: str) -> float:
    c = row["comm"]
    if kind == "all-to-all":
        return c.get("all-to-all", 0.0) + c.get("ragged-all-to-all", 0.0)
    return c.get(kind, 0.0)


def columns(row: dict) -> list[str]:
    fits = "yes" if row["fits"] else ("?" if row["fits"] is None else "NO")
    return ([str(row["rank"]), row["strategy"], row["source"], _g(row["params"]),
             _g(row["optimizer"]), _g(row["act_temp"]), _g(row["total"]), fits,
             _g(row["analytic_total"]), _f(row["model_tflops"], "{:.0f}")]
            + [_g(_comm(row, k)) for _, k in _KINDS]
            + [_f(row["compute_s"]), _f(row["comm_s"]), _f(row["step_s"]),
               _f(100 * row["mfu"], "{:.0f}%") if row["fits"] else "—",
               _f(row["compile_s"], "{:.0f}"), _g(row["host_rss"])])


HEADERS = (["#", "strategy", "source", "params", "opt", "act+temp", "total", "fits", "model",
            "TFLOP"] + [k for k, _ in _KINDS]
           + ["compute s", "comm s", "step s", "MFU", "compile s", "host RSS"])


def _title(header: dict) -> str:
    return (f"{header['model']} ({header['params_b']:.1f}B + {header['mtp_b']:.1f}B MTP) on "
            f"{header['target']}, global batch {header['batch']} × seq {header['seq']}"
            f"{_micro(header)}, "
            f"remat {header['remat']}, {header['dtype']} compute, {header['param_dtype']} "
            f"params; HBM {header['hbm_gib']:.2f} GiB/{_unit(header)}, peak "
            f"{header['peak_tflops']:.0f} TFLOP/s/{_unit(header)}")


def _micro(header: dict) -> str:
    k = header.get("microbatches", 1)
    return f" in {k} micro-batches" if k > 1 else ""


def _unit(header: dict) -> str:
    """What the per-chip figures are per: "chip", or "device" where a chip is several."""
    return header.get("unit", "chip")


def _notes(rows: list[dict]) -> list[str]:
    return [f"{r['rank']}. {r['strategy']}: {r['note']}" for r in rows if r.get("note")]


def buffer_label(b: dict) -> str:
    """'21.0 GiB bf16[3,256,7168,2048] temp (…/moe/dot_general)' for one `buffers.Buffer`."""
    op = b["op"] or b["name"]
    parts = op.split("/")
    short = "/".join(parts[-3:]) if len(parts) > 3 else op
    return f"{b['bytes'] / GiB:.2f} GiB {b['shape']} {b['kind']} ({short})"


def _buffers(rows: list[dict], n: int) -> list[str]:
    """For each compiled row: its `n` largest buffers (the compiler's buffer assignment)."""
    out = []
    for r in rows:
        if r.get("buffers"):
            out.append(f"{r['rank']}. {r['strategy']}, largest buffers per chip:")
            out += [f"   {buffer_label(b)}" for b in r["buffers"][:n]]
        if r.get("peak_buffers"):
            out.append(f"{r['rank']}. {r['strategy']}, live at the memory peak "
                       f"({r['peak_live'] / GiB:.1f} GiB in all), largest:")
            out += [f"   {buffer_label(b)}" for b in r["peak_buffers"][:2 * n]]
    return out


def text_table(header: dict, rows: list[dict]) -> str:
    body = [HEADERS] + [columns(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADERS))]
    fmt = lambda line: "  ".join(c.rjust(w) if i not in (1, 2) else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(line, widths)))
    lines = [_title(header),
             f"memory and collectives in GiB per {_unit(header)} per step; times in s",
             fmt(body[0]), fmt(["-" * w for w in widths])] + [fmt(b) for b in body[1:]]
    if header.get("analytic_only"):
        lines.append("analytic only: nothing was compiled for this target")
    return "\n".join(lines + _notes(rows) + _buffers(rows, 3))


def markdown(header: dict, rows: list[dict]) -> str:
    lines = ["# Sharding plan", "", _title(header) + ".", "",
             f"Memory and collectives in GiB per {_unit(header)} per step, times in seconds per "
             "step. "
             "`model` is the analytic memory estimate; `total` is the compiler's when the "
             "source says compiled.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(columns(r)) + " |" for r in rows]
    notes = _notes(rows)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += _buffer_lists(rows, "buffers", "Largest buffers per chip (compiler's buffer "
                           "assignment; two may never be live at once):")
    lines += _buffer_lists(rows, "peak_buffers", "Live together at the memory peak, largest "
                           "first (the compiler's live ranges):")
    return "\n".join(lines) + "\n"


def _buffer_lists(rows: list[dict], key: str, title: str) -> list[str]:
    """Markdown: `title`, then one line per row listing its `key` buffers."""
    listed = [r for r in rows if r.get(key)]
    if not listed:
        return []
    out = ["", title, ""]
    for r in listed:
        total = f" ({r['peak_live'] / GiB:.1f} GiB in all)" if key == "peak_buffers" else ""
        out.append(f"- {r['rank']}. {r['strategy']}{total}: "
                   + "; ".join(buffer_label(b) for b in r[key]))
    return out


CSV_FIELDS = ["rank", "strategy", "preset", "remat", "source", "dcn_data", "data", "stage",
              "fsdp", "context", "expert", "tensor", "params_gib", "optimizer_gib",
              "act_temp_gib", "total_gib", "analytic_total_gib", "hbm_gib", "fits", "model_tflops", "xla_tflops",
              "all_gather_gib", "reduce_scatter_gib", "all_reduce_gib", "all_to_all_gib",
              "collective_permute_gib", "analytic_all_gather_gib",
              "analytic_reduce_scatter_gib", "analytic_all_reduce_gib",
              "analytic_all_to_all_gib", "analytic_collective_permute_gib", "compute_s", "comm_s",
              "step_s", "mfu", "compile_s", "host_rss_gib", "note", "largest_buffers",
              "peak_buffers"]


def csv_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        d = {"rank": r["rank"], "strategy": r["strategy"], "preset": r["preset"],
             "remat": r.get("remat", ""),
             "source": r["source"], **r["mesh"], "fits": r["fits"], "note": r.get("note", ""),
             "largest_buffers": "; ".join(buffer_label(b) for b in r.get("buffers", [])),
             "peak_buffers": "; ".join(buffer_label(b) for b in r.get("peak_buffers", []))}
        for key in ("params", "optimizer", "act_temp", "total", "analytic_total", "hbm",
                    "host_rss"):
            d[f"{key}_gib"] = r[key] / GiB
        for key in ("model_tflops", "xla_tflops", "compute_s", "comm_s", "step_s", "mfu",
                    "compile_s"):
            d[key] = r[key]
        for _, kind in _KINDS:
            col = kind.replace("-", "_")
            d[f"{col}_gib"] = _comm(r, kind) / GiB
            d[f"analytic_{col}_gib"] = r["analytic_comm"].get(kind, 0.0) / GiB
        out.append(d)
    return out


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for d in csv_rows(rows):
            w.writerow({k: d.get(k, "") for k in CSV_FIELDS})


def write_png(header: dict, rows: list[dict], path: str) -> None:
    """Two panels: memory per chip (stacked, HBM line) and estimated step time (compute vs
    communication), one bar per strategy in rank order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['rank']}. {r['strategy']}" for r in rows]
    y = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.5 * len(rows) + 2.2), sharey=True)
    left = [0.0] * len(rows)
    for key, name, color in (("params", "parameters", "#4c72b0"),
                             ("optimizer", "optimizer", "#55a868"),
                             ("act_temp", "activations + temporaries", "#dd8452")):
        vals = [r[key] / GiB for r in rows]
        ax1.barh(y, vals, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, vals)]
    ax1.axvline(header["hbm_gib"], color="k", ls="--", lw=1, label=f"HBM {header['hbm_gib']:.0f} GiB")
    ax1.set_xlabel("GiB per chip")
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.legend(fontsize=7, loc="lower right")
    ax1.set_title("memory per chip", fontsize=9)
    comp = [r["compute_s"] for r in rows]
    comm = [r["comm_s"] for r in rows]
    ax2.barh([i - 0.2 for i in y], comp, height=0.4, color="#4c72b0", label="compute")
    ax2.barh([i + 0.2 for i in y], comm, height=0.4, color="#c44e52", label="communication")
    for i, r in enumerate(rows):
        ax2.plot([r["step_s"]], [i], "k|", ms=12)
    ax2.set_xlabel("seconds per step (| = estimated step)")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.set_title("analytic step time", fontsize=9)
    fig.suptitle(_title(header), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(header: dict, rows: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("plan.md", "plan.csv", "plan.png")]
    with open(paths[0], "w") as f:
        f.write(markdown(header, rows))
    write_csv(rows, paths[1])
    write_png(header, rows, paths[2])
    return paths
