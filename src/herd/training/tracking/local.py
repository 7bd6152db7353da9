"""The run directory's own record of training, with or without W&B: metrics.jsonl and loss.png."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from herd.paths import atomic_write

METRICS_LOG = "metrics.jsonl"  # one JSON object per log event: {"step", "kind", "time", metric: value...}
LOSS_PLOT = "loss.png"


def append_metrics(run_dir: Path, event: dict[str, Any]) -> None:
    """Add one log event to metrics.jsonl. Appended, not rewritten: a killed run keeps every line before it."""
    with open(run_dir / METRICS_LOG, "a") as f:
        f.write(json.dumps(event) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses_by_step(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train, eval) loss by step. A resumed run re-logs some steps; the latest value of each step wins."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for event in read_metrics(run_dir):
        if "train/loss" in event and event.get("kind") == "train":
            train[event["step"]] = event["train/loss"]
        if "eval/loss" in event:
            evals[event["step"]] = event["eval/loss"]
    return train, evals


def plot_losses(run_dir: str | Path) -> Path | None:
    """<run_dir>/loss.png: train and eval loss vs step, from metrics.jsonl. None when nothing has been
    logged yet."""
    run_dir = Path(run_dir)
    train, evals = _losses_by_step(run_dir)
    if not train and not evals:
        return None
    # The object API with an explicit Agg canvas: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        steps = sorted(train)
        axes.plot(steps, [train[s] for s in steps], label="train loss")
    if evals:
        steps = sorted(evals)
        axes.plot(steps, [evals[s] for s in steps], "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(run_dir.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    path = run_dir / LOSS_PLOT
    atomic_write(path, image.getvalue())
    return path
