"""
Training curves of a run, from RUN_DIR/metrics.jsonl (written by train.py) into RUN_DIR/curves.png.

    python plot.py runs/tiny
    python -c "import plot; plot.plot_run('runs/tiny')"     # what train.py calls at the end of a run

Each panel: the raw values against step as a thin line, and an exponential moving average (debiased, as
TensorBoard's smoothing) as a thick one. When several runs were appended to one metrics.jsonl (step going back
down), only the last is drawn. A metric the run did not log (e.g. rewards/format when trained with
--rewards accuracy) gets an "n/a" panel. Headless: matplotlib's Agg backend, no display needed.
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("rewards/format", "format reward"), ("rewards/accuracy", "accuracy reward"),
          ("completion_length", "completion length (tokens)"), ("kl", "KL to reference"),
          ("reward_std", "reward std within groups"), ("reward", "total reward")]


def ema(values, smoothing):
    """Debiased EMA: the first points are not pulled towards 0."""
    out, s = [], 0.0
    for t, v in enumerate(values, 1):
        s = smoothing * s + (1 - smoothing) * v
        out.append(s / (1 - smoothing ** t))
    return out


def read_metrics(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            if rows and row.get("step", math.inf) <= rows[-1].get("step", -math.inf):
                rows = []  # train.py appends: a run restarted in the same folder starts again at step 1; keep the last
            rows.append(row)
    if not rows:
        raise ValueError(f"plot: no metrics rows in {path}")
    return rows


def plot_run(run_dir, smoothing=0.8):
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/curves.png and return that path."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, PANELS):
        points = [(r["step"], float(r[key])) for r in rows
                  if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        ax.set_title(title)
        if not points:
            ax.text(0.5, 0.5, f"n/a\n(no {key} in metrics.jsonl)", ha="center", va="center", transform=ax.transAxes)
            continue
        steps, values = zip(*points)
        ax.plot(steps, values, lw=0.7, alpha=0.5, label="raw")
        ax.plot(steps, ema(values, smoothing), lw=2.0, label=f"EMA {smoothing}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(os.path.normpath(run_dir))
    fig.tight_layout()
    png = os.path.join(run_dir, "curves.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python plot.py RUN_DIR")
    print(f"wrote {plot_run(sys.argv[1])}")
