"""The study's report: ``study.json`` (every number), ``report.md`` and a self-contained ``report.html``.

Every number in the two reports is read from the ``study.json`` content built by :func:`collect`, so the
three always agree (a test checks it).
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from .reported import study_figures

ANALYSIS_TITLES = {
    "invariance": "Invariance: accuracy and consistency under translation, rotation and scale",
    "erf": "Effective receptive field per stage",
    "robustness": "Adversarial robustness: top-1 under FGSM and PGD",
    "cost": "Cost: images/s and peak memory against resolution (dense backbones)",
}


# ------------------------------------------------------------------------------------------------ collect
def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cost_at_size(cost: dict, model: str) -> dict:
    """Inference / training images/s and peak memory of the classification model (fp32 and amp)."""
    out = {}
    for e in (cost.get("models", {}).get(model, {}) or {}).get("classification", []):
        key = f"{e['mode']}_{e['precision']}"
        out[key] = {"images_per_sec": e.get("images_per_sec"), "peak_memory_mib": e.get("peak_memory_mib"),
                    "input_size": e.get("input_size"), "batch_size": e.get("batch_size")}
    return out


def _model_size(model: str, input_size: int, nb_classes: int) -> dict:
    """Params (M) and fvcore GFLOPs at the study's input size, from the backbones package's summary."""
    try:
        from stm_backbones.summary import summarize

        s = summarize(model, img_size=input_size, num_classes=nb_classes)
        return {"params_m": s["params"] / 1e6, "gflops": s["gflops"], "flops_input_size": input_size}
    except Exception as exc:  # noqa: BLE001 - a model without a summary still gets its accuracy reported
        return {"params_m": None, "gflops": None, "size_error": f"{type(exc).__name__}: {exc}"}


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def versions() -> dict:
    import numpy
    import timm
    import torch
    import torchvision

    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": numpy.__version__}


def collect(cfg, state) -> dict:
    """Everything the report shows, from the state and the files on disk."""
    from .runner import _flag_value, analysis_dir, size_groups

    nb_classes = int(_flag_value(cfg.train_args, "--nb_classes", 10 if cfg.data_path is None else 1000))
    analyses_dir = cfg.output_dir / "analyses"
    cost = {}
    if (analyses_dir / "cost.json").exists():
        cost = json.loads((analyses_dir / "cost.json").read_text())
    models = {}
    for model in cfg.models:
        log = _read_log(cfg.model_dir(model) / "log.txt")
        evals = state.step(f"eval:{model}").get("result", {})
        row = {
            "source": "checkpoint " + cfg.checkpoints[model] if model in cfg.checkpoints else "trained",
            "final": evals.get("model"),
            "final_ema": evals.get("ema"),
            "best_top1": max((r["test_acc1"] for r in log if "test_acc1" in r), default=None),
            "best_top1_ema": max((r["test_acc1_ema"] for r in log if "test_acc1_ema" in r), default=None),
            "epochs": len(log),
            "train_images_per_sec": log[-1].get("train_train_images_per_sec", log[-1].get("train_images_per_sec"))
            if log else None,
            "curve": [{"epoch": r["epoch"], "train_loss": r.get("train_loss"), "test_acc1": r.get("test_acc1"),
                       "test_acc1_ema": r.get("test_acc1_ema")} for r in log],
            "cost": _cost_at_size(cost, model),
            "study": study_figures(model),
            "input_size": cfg.input_sizes.get(model),
        }
        row.update(_model_size(model, 224, 1000))
        models[model] = row
    analyses = {}
    for name in cfg.analyses:
        sizes = [224] if name == "cost" else sorted(size_groups(cfg))
        for size in sizes:
            folder = analysis_dir(cfg, size, name)
            path = folder / f"{name}.json"
            if not path.exists():
                continue
            key = name if folder == analyses_dir else f"{name}@{size}px"
            analyses[key] = {"json": os.path.relpath(path, cfg.output_dir), "input_size": size,
                             "figures": sorted(os.path.relpath(p, cfg.output_dir) for p in folder.glob(f"{name}*.png")),
                             "data": json.loads(path.read_text())}
    sizes_used = sorted(set(cfg.input_sizes.values()))
    input_size = sizes_used[0] if len(sizes_used) == 1 else sizes_used
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": state.data.get("command"),
        "models": models,
        "analyses": analyses,
        "recipe": {"data": cfg.data_path or "embedded digits", "epochs": cfg.epochs, "input_size": input_size,
                   "nb_classes": nb_classes, "seed": cfg.seed, "train_args": cfg.train_args,
                   "launcher": cfg.launcher},
        "versions": versions(),
        "machine": machine_info(),
        "steps": {k: {kk: v.get(kk) for kk in ("status", "attempts", "command")} for k, v in state.data["steps"].items()},
    }


# ------------------------------------------------------------------------------------------------ render
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def accuracy_table(study: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "input (px)", "params (M)", "GFLOPs (224²)", "top-1", "top-5", "top-1 EMA", "top-5 EMA", "best top-1",
              "best top-1 EMA", "infer img/s (fp32)", "train img/s (fp32)", "peak MiB (train fp32)",
              "study ImageNet top-1", "study COCO box / mask AP"]
    rows = []
    for model, m in study["models"].items():
        final, ema, cost, ref = m["final"] or {}, m["final_ema"] or {}, m["cost"], m["study"]
        rows.append([
            f"`{model}`", _fmt(m.get("input_size")), _fmt(m.get("params_m")), _fmt(m.get("gflops"), 3), _fmt(final.get("top1")),
            _fmt(final.get("top5")), _fmt(ema.get("top1")), _fmt(ema.get("top5")), _fmt(m["best_top1"]),
            _fmt(m["best_top1_ema"]), _fmt((cost.get("inference_fp32") or {}).get("images_per_sec"), 1),
            _fmt((cost.get("training_fp32") or {}).get("images_per_sec"), 1),
            _fmt((cost.get("training_fp32") or {}).get("peak_memory_mib"), 0),
            _fmt(ref["imagenet_top1"], 1) if ref else "—",
            f"{ref['coco_box_ap']:.1f} / {ref['coco_mask_ap']:.1f}" if ref else "—",
        ])
    return header, rows


def plot_training_curves(study: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {m: v["curve"] for m, v in study["models"].items() if v["curve"]}
    if not curves:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for model, curve in curves.items():
        epochs = [c["epoch"] for c in curve]
        line = ax_loss.plot(epochs, [c["train_loss"] for c in curve], marker="o", label=model)[0]
        ax_acc.plot(epochs, [c["test_acc1"] for c in curve], marker="o", color=line.get_color(), label=model)
        if any(c["test_acc1_ema"] is not None for c in curve):
            ax_acc.plot(epochs, [c["test_acc1_ema"] for c in curve], linestyle="--", color=line.get_color())
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation top-1 (dashed: EMA)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def render_markdown(study: dict, figures: dict[str, list[str]]) -> str:
    header, rows = accuracy_table(study)
    r = study["recipe"]
    lines = [
        "# Spatial token mixer study: report", "",
        f"Generated {study['generated']} by `{study['command']}`.", "",
        f"Recipe: data {r['data']}, {r['epochs'] if r['epochs'] is not None else 'the app default'} epochs, "
        f"input {r['input_size']} px, {r['nb_classes']} classes, seed {r['seed']}, launcher {r['launcher']}, "
        f"training flags `{' '.join(r['train_args']) or '(none)'}`.", "",
        "## Accuracy and cost", "",
        "top-1/top-5: the final weights (and their EMA) evaluated by `main.py --eval`; best: the highest "
        "validation top-1 during training. Params and GFLOPs at 224² with 1000 classes (fvcore, the study's "
        "convention); images/s and peak memory from the cost analysis at 224² (batch and device in "
        "`analyses/cost.json`). The study's columns are its published figures for its ImageNet checkpoints.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    if figures.get("training"):
        lines += ["## Training curves", "", f"![training curves]({figures['training'][0]})", ""]
    for name, data in study["analyses"].items():
        base, _, at = name.partition("@")
        title = ANALYSIS_TITLES.get(base, base) + (f" ({at} inputs)" if at else "")
        lines += [f"## {title}", "", f"Numbers: `{data['json']}`.", ""]
        lines += [f"![{name}]({fig})" for fig in data["figures"]]
        lines.append("")
    v, m = study["versions"], study["machine"]
    lines += ["## Reproducibility", "", f"- command: `{study['command']}`",
              "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
              f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), GPU: {m['gpu'] or 'none'}, {m['platform']}",
              f"- seed: {r['seed']}", "- every number: `study.json`; step states: `state.json`", ""]
    return "\n".join(lines)


def render_html(study: dict, figures: dict[str, list[str]], root: Path) -> str:
    """The same content as the markdown, as one HTML file with the figures embedded (base64)."""
    def img(rel: str) -> str:
        data = base64.b64encode((root / rel).read_bytes()).decode()
        return f'<img alt="{html.escape(rel)}" src="data:image/png;base64,{data}" style="max-width:100%">'

    header, rows = accuracy_table(study)
    r, v, m = study["recipe"], study["versions"], study["machine"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Spatial token mixer study</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}</style>",
        "</head><body><h1>Spatial token mixer study: report</h1>",
        f"<p>Generated {html.escape(study['generated'])} by <code>{html.escape(str(study['command']))}</code>.</p>",
        f"<p>Recipe: data {html.escape(str(r['data']))}, {r['epochs']} epochs, input {r['input_size']} px, "
        f"seed {r['seed']}, launcher {html.escape(r['launcher'])}.</p>",
        "<h2>Accuracy and cost</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
    ]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(c.strip('`'))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    if figures.get("training"):
        parts += ["<h2>Training curves</h2>", img(figures["training"][0])]
    for name, data in study["analyses"].items():
        base, _, at = name.partition("@")
        parts.append(f"<h2>{html.escape(ANALYSIS_TITLES.get(base, base) + (f' ({at} inputs)' if at else ''))}</h2>")
        parts += [img(fig) for fig in data["figures"]]
    parts += ["<h2>Reproducibility</h2><ul>", f"<li>command: <code>{html.escape(str(study['command']))}</code></li>",
              "<li>versions: " + html.escape(", ".join(f"{k} {val}" for k, val in v.items())) + "</li>",
              f"<li>machine: {html.escape(str(m['cpu']))} ({m['cpu_count']} CPUs), GPU: {html.escape(str(m['gpu']))}</li>",
              f"<li>seed: {r['seed']}</li></ul></body></html>"]
    return "\n".join(parts)


def write(cfg, study: dict) -> None:
    from .runner import write_text_atomic

    out = cfg.output_dir
    figures = {}
    curves = plot_training_curves(study, out / "training_curves.png")
    if curves:
        figures["training"] = [os.path.relpath(curves, out)]
    write_text_atomic(out / "study.json", json.dumps(study, indent=1, default=str))
    write_text_atomic(out / "report.md", render_markdown(study, figures))
    write_text_atomic(out / "report.html", render_html(study, figures, out))
    print(f"[study] report: {out / 'report.md'} and {out / 'report.html'}; numbers: {out / 'study.json'}")


def copy_report(src: Path, dst: Path) -> list[Path]:
    """Copy a finished study's report, JSON and figures (not the checkpoints, logs or raw maps) to ``dst``
    (e.g. docs/study), keeping the relative paths the report links to. Returns the files copied."""
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in ("train", "jobs") or not path.is_file():
            continue
        if path.suffix in (".md", ".html", ".json", ".png", ".csv") and path.name != "state.json":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)
            copied.append(dst / rel)
    return copied
