"""
Training curves of a run, from RUN_DIR/metrics.jsonl (written by train.py) into RUN_DIR/curves.png.

    python plot.py runs/tiny
    python plot.py runs/qwen2-vl-7b runs/qwen2-vl-2b       # overlay runs, one colour each: runs/qwen2-vl-7b/curves.png
    python plot.py runs/a runs/b --output a_vs_b.png
    python -c "import plot; plot.plot_run('runs/tiny')"     # what train.py calls at the end of a run

The first row is the seed's figure (accuracy reward, format reward, completion length, thinking length); then the
2B collapse (empty thinking ratio), answer variety within groups (answer entropy), KL, reward std and total reward.
The png goes to --output, by default into the first run's folder.

Each panel: the raw values against step as a thin line, and an exponential moving average (debiased, as
TensorBoard's smoothing) as a thick one. When several runs were appended to one metrics.jsonl (step going back
down), only the last is drawn. A metric the run did not log (e.g. rewards/format when trained with
--rewards accuracy) gets an "n/a" panel. Headless: matplotlib's Agg backend, no display needed.
"""
import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("rewards/accuracy", "accuracy reward"), ("rewards/format", "format reward"),
          ("completion_length", "completion length (tokens)"), ("thinking_length", "thinking length (tokens)"),
          ("empty_thinking_ratio", "empty thinking ratio"), ("answer_entropy", "answer entropy in a group (nats)"),
          ("kl", "KL to reference"), ("reward_std", "reward std within groups"), ("reward", "total reward")]


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
    return plot_runs([run_dir], smoothing=smoothing)


def plot_runs(run_dirs, output=None, smoothing=0.8):
    """Overlay the runs' metrics, one colour per run (raw thin, EMA thick), into output (default: the first run's
    curves.png) and return its path."""
    runs = [(os.path.normpath(d), read_metrics(os.path.join(d, "metrics.jsonl"))) for d in run_dirs]
    fig, axes = plt.subplots(3, 3, figsize=(14, 10))
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.set_title(title)
        drawn = False
        for k, (name, rows) in enumerate(runs):
            points = [(r["step"], float(r[key])) for r in rows
                      if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if not points:
                continue
            steps, values = zip(*points)
            color = f"C{k % 10}"
            ax.plot(steps, values, lw=0.7, alpha=0.35, color=color)
            ax.plot(steps, ema(values, smoothing), lw=2.0, color=color, label=name)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"n/a\n(no {key} in metrics.jsonl)", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(" vs ".join(name for name, _ in runs) + f"  (thick: EMA {smoothing}, thin: raw)")
    fig.tight_layout()
    png = output or os.path.join(run_dirs[0], "curves.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    ap.add_argument("--output", default=None, help="png path (default: the first run's folder/curves.png)")
    ap.add_argument("--smoothing", type=float, default=0.8, help="EMA smoothing in [0, 1)")
    args = ap.parse_args()
    print(f"wrote {plot_runs(args.runs, args.output, args.smoothing)}")
