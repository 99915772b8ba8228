"""The comparison's report folder for bench/paper_table.py: one markdown, one JSON, four PNGs.

`write_outputs(result, out, runs)` (re)writes, atomically:
- report.json: the result dict (settings, the epoch plan and why, per objective its training time,
  views/s and both evaluation reports);
- report.md: `markdown(result)`, the tables (detection per OOD set and averaged for KNN and
  Mahalanobis, embedding quality, ReweightOOD minus the unweighted baseline, training);
- training.png: loss (relative to its first logged value) and views/s per epoch of each objective;
- score_histograms.png, roc.png, embedding_2d.png: each plot of the per-run KNN reports
  (trainer.report, in RUN_DIR/eval_knn) tiled over the objectives, one labelled tile each.
Plots need matplotlib (and scikit-learn for the ROC curves); without them only the text is
written. Small enough to bring back from a remote machine (about 1-2 MB in all).
"""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from detector_server.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from trainer.report import PLOTS, detection_table, quality_table

log = logging.getLogger("reweightood.bench")

TILE_COLUMNS = {"score_histograms.png": 1, "roc.png": 2, "embedding_2d.png": 2}


def write_outputs(result: dict[str, Any], out: Path, runs: dict[str, Path]) -> list[Path]:
    """Write report.json, report.md and the PNGs of the finished `runs` ({objective: run dir})."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out / "report.json", result, default=str),
               write_text_atomic(out / "report.md", markdown(result))]
    if not runs:
        return written
    if _training_figure(runs, out / "training.png"):
        written.append(out / "training.png")
    for name in PLOTS:
        tiles = [(f"{objective} (KNN)", run / "eval_knn" / name) for objective, run in runs.items()]
        if _tile([(label, p) for label, p in tiles if p.is_file()], out / name,
                 TILE_COLUMNS.get(name, 2)):
            written.append(out / name)
    return written


def environment() -> dict[str, Any]:
    """Python, torch, the device and faiss versions, for the report."""
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        from detector_server._faiss import faiss
        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    return env


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """report.md: what was run and why, then the tables of every finished objective."""
    objs = result["objectives"]
    recipe, plan = result["recipe"], result.get("plan", {})
    lines = [f"# Paper comparison, budget `{result['budget']}`"
             + (" (dry run)" if result.get("dry_run") else ""), "",
             f"Status: **{result['status']}** ({len(objs)} objective(s) finished"
             + (f", {result['elapsed_s']:.0f} s" if "elapsed_s" in result else "") + ").", "",
             f"- Network `{recipe.get('arch')}`, preset `{recipe.get('preset')}`: batch "
             f"{recipe.get('batch_size')}, lr {recipe.get('lr')}, weight decay "
             f"{recipe.get('weight_decay')}, warm-up epochs {recipe.get('warmup_epochs')}, "
             f"bf16 autocast {recipe.get('amp')}, torch.compile {recipe.get('compile')}, "
             f"seed {result['seed']}; the same recipe and epochs for every objective.",
             f"- Epochs: {plan.get('why', 'not planned yet')}",
             f"- Training data `{result['data']['train']}`; ID test `{result['data']['id_test']}`; "
             "OOD " + ", ".join(f"{n} `{p}`" for n, p in result["data"]["ood"].items()) + ".",
             f"- {result['k_reason']}",
             f"- Machine: {result['environment']}."]
    if not objs:
        return "\n".join(lines) + "\n"
    rows = {f"{o} ({post})": r["reports"][post] for o, r in objs.items() for post in r["reports"]}
    first = next(iter(rows.values()))
    s = first["settings"]
    lines += ["", f"Bank of {s['bank_size']} training images, ID test {s['id_test']['n']} images; "
              f"scores on the {s['feature']} feature; ID is the positive class; numbers in %; "
              "FPR@95 lower is better.", "",
              "## OOD detection (FPR@95 / AUROC per set, then the average)", "",
              detection_table(rows), ""]
    second = {o: r["knn_k100"] for o, r in objs.items() if r.get("knn_k100")}
    if second:
        lines += ["KNN at K=100 (second, for reference), average over the OOD sets: " + "; ".join(
            f"{o} FPR@95 {_pct(v['average']['fpr@95'])}, AUROC {_pct(v['average']['auroc'])}"
            for o, v in second.items()) + ".", ""]
    lines += ["## Embedding quality of the bank (paper section 4.1) and ID accuracy", "",
              quality_table({o: r["reports"]["knn"] for o, r in objs.items()}), "",
              first["embedding_quality"]["note"], ""]
    lines += _claims(objs)
    lines += ["## Training", "", "| objective | epochs | training (s) | evaluation (s) | "
              "views/s (median epoch) | final loss |", "|---|---|---|---|---|---|"]
    for o, r in objs.items():
        train_s = "reused" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(f"| {o} | {r['epochs']} | {train_s} | {r['eval_seconds']:.0f} | "
                     f"{r['views_per_s_median_epoch']:,.0f} | {r['final_loss']:.4f} |")
    probe = plan.get("probe")
    if probe:
        lines += ["", f"Probe: {probe['epochs']} epoch(s) of reweightood at "
                  f"{probe['views_per_s']:,.0f} views/s, {probe['train_s']:.1f} s training + "
                  f"{probe['eval_s']:.1f} s evaluation; fixed cost per run {probe['fixed_s']:.1f} s."]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in ("training.png", *PLOTS)]
    return "\n".join(lines) + "\n"


def _claims(objs: dict[str, Any]) -> list[str]:
    """ReweightOOD minus the unweighted baseline (negative FPR/radius/dispersion = the paper's
    claim holds here)."""
    a, b = objs.get("reweightood"), objs.get("unweighted")
    if not (a and b):
        return []
    lines = ["## ReweightOOD minus the unweighted baseline", ""]
    for post in a["reports"]:
        ra, rb = a["reports"][post]["average"], b["reports"][post]["average"]
        if ra and rb:
            lines.append(f"- {post}: average FPR@95 {100 * (ra['fpr@95'] - rb['fpr@95']):+.2f} "
                         f"points, AUROC {100 * (ra['auroc'] - rb['auroc']):+.2f} points")
    qa = a["reports"]["knn"]["embedding_quality"]["penultimate"]
    qb = b["reports"]["knn"]["embedding_quality"]["penultimate"]
    lines.append(f"- MES radius {qa['mean_radius'] - qb['mean_radius']:+.4f}, dispersion (mean "
                 f"centroid cosine) {qa['dispersion'] - qb['dispersion']:+.4f}")
    return lines + ["", "The paper claims lower FPR@95, a smaller radius and a lower dispersion "
                    "for ReweightOOD: negative numbers above agree with it, positive ones do not.", ""]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _training_figure(runs: dict[str, Path], path: Path) -> bool:
    """Loss / first loss against epochs, and views/s per epoch, one line per objective."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("training.png skipped: matplotlib is not installed")
        return False
    fig = Figure(figsize=(11.0, 3.8))
    ax_loss, ax_rate = fig.subplots(1, 2)
    for objective, run in runs.items():
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        per_epoch = max(r["step"] for r in recs) + 1
        rates = {r["epoch"]: r["views_per_s"] for r in recs}
        style = dict(label=objective, linewidth=1, marker="o" if len(rates) < 30 else None,
                     markersize=3)                      # a short run still shows its points
        ax_loss.plot([r["global_step"] / per_epoch for r in recs],
                     [r["loss"] / recs[0]["loss"] for r in recs], **style)
        ax_rate.plot([e + 1 for e in rates], list(rates.values()), **style)
    ax_loss.set(xlabel="epoch", ylabel="loss / first logged loss", title="training loss")
    ax_rate.set(xlabel="epoch", ylabel="views/s (loop only)", title="training speed")
    for ax in (ax_loss, ax_rate):
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_bytes_atomic(path, _png(fig))
    return True


def _tile(items: list[tuple[str, Path]], path: Path, ncols: int) -> bool:
    """Paste PNGs into one grid (ncols wide), each under a label strip. False when none."""
    if not items:
        return False
    from PIL import Image, ImageDraw, ImageFont

    cells = [(label, Image.open(p).convert("RGB")) for label, p in items]
    w, h = max(im.width for _, im in cells), max(im.height for _, im in cells)
    head, ncols = 30, min(ncols, len(cells))
    canvas = Image.new("RGB", (ncols * w, math.ceil(len(cells) / ncols) * (h + head)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=20)
    except TypeError:  # Pillow < 10.1: one fixed size
        font = ImageFont.load_default()
    for i, (label, im) in enumerate(cells):
        row, col = divmod(i, ncols)
        x, y = col * w, row * (h + head)
        draw.text((x + 10, y + 4), label, fill="black", font=font)
        canvas.paste(im, (x, y + head))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return True
