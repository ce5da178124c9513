"""Draws docs/architecture.png, the picture at the top of the README.

Re-render after editing the tables below: `.venv/bin/python docs/architecture_diagram.py`
(`--out other.svg` writes SVG instead). Only matplotlib is needed. Coordinates are in a
130 × 82 canvas, origin at the bottom left.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.png"

INK, EDGE, FAINT = "#222222", "#555555", "#888888"
APP, CONTROL, ENGINE, TRAFFIC = "#e8eef7", "#f3ecf7", "#e9f5e9", "#fff4e0"
TIER, STORE, NODE = "#fffaf0", "#eeeeee", "#fbfbfb"
PATH_A, PATH_B, HANDOFF = "#1f6fd1", "#e07b00", "#2e9b3a"  # PE-side read, DE-side read, PE→DE
READ_B = "B: DE-side read\nNVMe → SNIC → DRAM\n→ forwarded to the PE"
KV_HANDOFF = "KV handoff\nlayer by layer\nNIXL | object store\n+ first token"

INGRESS = (
    "API key → tenant · chat template · token ids · block keys\n"
    "admission gate: tenant limits, tier queues\n"
    "(priority > default > flex), capacity lease, billing + audit\n"
    "per choice: plan → load → prefill → decode"
)
SCHEDULER = (
    "plan(): which PE, which DE, which side reads\n"
    "the stored KV (PE side, DE side, or split)\n"
    "view: engine loads, each node's SNIC queue,\n"
    "cluster KV index (which block, which tier)"
)
CLIENTS = "HTTP :8000, OpenAI API\n(curl, openai SDK)\nRay handle\n(app.client.DualPathClient)"
PREFILL = "EngineCore, paged KV\nhit KV copied in layer\nby layer while the miss\ntokens compute;"
DECODE = "EngineCore, paged KV\ncontinuous batch;\nstreams tokens;\npersists each\nfull block"
SNIC = "storage NIC: read/write\nqueues, bandwidth cap"
NVME = "one checksummed file per KV block, in a local directory or a mount all nodes share"

# (x, y, width, height, title, body, fill, title size, dashed outline)
BOXES = [
    (1, 66, 22, 13, "Clients", CLIENTS, APP, 10, False),
    (31, 63, 46, 16, "Ingress  (app/)", INGRESS, APP, 10, False),
    (87, 63, 42, 16, "Scheduler  (deployments/scheduler)", SCHEDULER, CONTROL, 10, False),
    (1, 11.5, 60, 42.5, "", "", NODE, 10, True),  # the request's PE node
    (69, 11.5, 60, 42.5, "", "", NODE, 10, True),  # the request's DE node
    (3, 16, 26, 32, "TrafficManager", "the node's KV store", TRAFFIC, 10, False),
    (5, 32, 22, 9, "DRAM tier", "Ray object store", TIER, 9, False),
    (5, 18, 22, 9.5, "SNIC", SNIC, TIER, 9, False),
    (36, 26, 23, 22, "PrefillEngine", PREFILL + "\nsamples token 1", ENGINE, 10, False),
    (71, 26, 23, 22, "DecodeEngine", DECODE, ENGINE, 10, False),
    (101, 16, 26, 32, "TrafficManager", "the node's KV store", TRAFFIC, 10, False),
    (103, 32, 22, 9, "DRAM tier", "Ray object store", TIER, 9, False),
    (103, 18, 22, 9.5, "SNIC", SNIC, TIER, 9, False),
    (1, 1, 128, 8, "NVMe tier", NVME, STORE, 9.5, False),
]

# (start, end, color, line width, arc, dashed, two-headed)
ARROWS = [
    ((23.3, 72.5), (30.7, 72.5), INK, 1.4, 0.0, False, False),  # clients → Ingress
    ((77.3, 73.5), (86.7, 73.5), INK, 1.4, 0.0, False, False),  # PlanRequest
    ((86.7, 69.5), (77.3, 69.5), INK, 1.4, 0.0, False, False),  # Plan
    ((44, 62.6), (47.5, 48.4), INK, 1.4, 0.0, False, False),  # PrefillJob
    ((66, 62.6), (80, 48.4), INK, 1.4, 0.0, False, False),  # DecodeJob
    ((86, 48.4), (74, 62.6), INK, 1.4, 0.0, False, False),  # token stream
    ((99, 54.2), (106, 62.6), FAINT, 1.0, 0.0, True, False),  # load + node reports
    ((16, 31.6), (16, 27.9), FAINT, 1.0, 0.0, False, True),  # DRAM ↔ NVMe (PE node)
    ((114, 31.6), (114, 27.9), FAINT, 1.0, 0.0, False, True),  # DRAM ↔ NVMe (DE node)
    ((12, 9.4), (12, 17.7), PATH_A, 2.4, 0.0, False, False),  # A: NVMe → PE node's SNIC
    ((27.4, 38), (35.6, 38), PATH_A, 2.4, 0.0, False, False),  # A: DRAM → PE
    ((118, 9.4), (118, 17.7), PATH_B, 2.4, 0.0, False, False),  # B: NVMe → DE node's SNIC
    ((104.5, 41.4), (57.5, 48.4), PATH_B, 2.4, 0.38, False, False),  # B: forward to the PE
    ((59.4, 36), (70.6, 36), HANDOFF, 3.0, 0.0, False, False),  # PE → DE KV handoff
    ((94.4, 36), (102.6, 36), FAINT, 1.3, 0.0, True, False),  # DE persists full blocks
]

# (x, y, text, color, size, bold, white background)
LABELS = [
    (82, 75.6, "PlanRequest", INK, 7.6, False, True),
    (82, 67.4, "Plan", INK, 7.6, False, True),
    (47.5, 58.4, "PrefillJob\n(hit handles)", INK, 7.6, False, True),
    (70.5, 58.0, "DecodeJob", INK, 7.6, False, True),
    (88.0, 58.6, "tokens → SSE /\nhandle stream", INK, 7.6, False, True),
    (112, 58.2, "load + node reports\n(engines, SNICs, index)", FAINT, 7.4, False, True),
    (47.5, 21, "A: PE-side read\nNVMe → SNIC → DRAM → PE", PATH_A, 8.2, True, True),
    (82.5, 21, READ_B, PATH_B, 8.2, True, True),
    (65, 29.5, KV_HANDOFF, HANDOFF, 7.4, True, True),
    (98, 31, "persist\nfull\nblocks", FAINT, 7.4, False, True),
    (31, 13.2, "logical node  (the request's PE side)", FAINT, 9.5, True, False),
    (99, 13.2, "logical node  (the request's DE side)", FAINT, 9.5, True, False),
]


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(13, 8.2))
    ax.set_xlim(0, 130)
    ax.set_ylim(0, 82)
    ax.axis("off")
    for x, y, w, h, title, body, fill, size, dashed in BOXES:
        style = "round,pad=0.2,rounding_size=1.2"
        line = "--" if dashed else "-"
        patch = FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=fill, edgecolor=EDGE)
        patch.set_linestyle(line)
        ax.add_patch(patch)
        title_y, where = (y + h - 1.6, "top") if body else (y + h / 2, "center")
        text = {"ha": "center", "color": INK}
        ax.text(x + w / 2, title_y, title, va=where, fontsize=size, fontweight="bold", **text)
        if body:
            ax.text(x + w / 2, y + h - 4.4, body, va="top", fontsize=size - 2.2, **text)
    for start, end, color, width, rad, dashed, both in ARROWS:
        arrow = FancyArrowPatch(
            start,
            end,
            arrowstyle="<|-|>" if both else "-|>",
            mutation_scale=13,
            color=color,
            linewidth=width,
            linestyle=(0, (4, 3)) if dashed else "-",
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=2,
            shrinkB=2,
        )
        ax.add_patch(arrow)
    for x, y, text, color, size, bold, backed in LABELS:
        back = {"facecolor": "white", "edgecolor": "none", "pad": 1.0, "alpha": 0.9}
        weight = "bold" if bold else "normal"
        ax.text(
            x,
            y,
            text,
            ha="center",
            va="center",
            fontsize=size,
            color=color,
            fontweight=weight,
            bbox=back if backed else None,
        )
    fig.savefig(out, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help="PNG or SVG path")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
