"""
Training curves of a run, from RUN_DIR/metrics.jsonl (written by train.py) into RUN_DIR/curves.png.

    python plot.py runs/tiny
    python plot.py runs/qwen2-vl-7b runs/qwen2-vl-2b       # overlay runs, one colour each: runs/qwen2-vl-7b/curves.png
    python plot.py runs/a runs/b --output a_vs_b.png
    python -c "import plot; plot.plot_run('runs/tiny')"     # what train.py calls at the end of a run

The first row is Video-R1's first trainer's figure (accuracy reward, format reward, completion length, thinking length); then the
2B collapse (empty thinking ratio), answer variety within groups (answer entropy), KL, reward std and total reward.
The reward panels draw the run's own accuracy-type and format-type rewards (the first of its --rewards whose name
holds "accuracy" / "format": rewards/video_r1_first_accuracy in a run of its first recipe); Video-R1's first trainer's metrics (video_r1_first/...) are drawn
dashed over their panels where the run logged them.
The png goes to --output, by default into the first run's folder.

Each panel: the raw values against step as a thin line, and an exponential moving average (debiased, as
TensorBoard's smoothing) as a thick one. When several runs were appended to one metrics.jsonl (step going back
down), only the last is drawn. A metric no run logged gets an "n/a" panel. Headless: matplotlib's Agg backend, no
display needed.
"""
import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

import rewards  # noqa: E402

# (metric, title, Video-R1's first trainer's metric drawn dashed where a run logged it). The two reward panels draw each run's own
# accuracy-type and format-type reward, whatever its name (reward_key): rewards/video_r1_first_accuracy in a run of its first recipe.
PANELS = [("rewards/accuracy", "accuracy reward", "video_r1_first/rewards/accuracy_reward"),
          ("rewards/format", "format reward", "video_r1_first/rewards/format_reward"),
          ("completion_length", "completion length (tokens)", None), ("thinking_length", "thinking length (tokens)", None),
          ("empty_thinking_ratio", "empty thinking ratio", None), ("answer_entropy", "answer entropy in a group (nats)", None),
          ("kl", "KL to reference", "video_r1_first/kl"), ("reward_std", "reward std within groups", "video_r1_first/reward_std"),
          ("reward", "total reward", "video_r1_first/reward")]
KINDS = {"rewards/accuracy": "accuracy", "rewards/format": "format"}


def reward_key(run_dir, rows, key):
    """The run's metric for a panel: for the two reward panels, rewards/<the run's accuracy reward (run_config.json's
    accuracy_reward, when it is one of its --rewards), else the first of its rewards whose name holds "accuracy" /
    "format"> (its run_config.json's --rewards, else the rewards/* keys it logged); else key itself."""
    if key not in KINDS:
        return key
    config, run_config = os.path.join(run_dir, "run_config.json"), {}
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            run_config = json.load(f)
        names = [n.strip() for n in run_config.get("rewards", "").split(",")]
    else:
        names = [k.removeprefix("rewards/") for row in rows for k in row if k.startswith("rewards/")]
    name = rewards.reward_of_kind(names, KINDS[key])
    if KINDS[key] == "accuracy" and run_config.get("accuracy_reward") in names:  # the run's own (--accuracy_reward)
        name = run_config["accuracy_reward"]
    return f"rewards/{name}" if name else key


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
    fig = draw(run_dirs, smoothing)
    png = output or os.path.join(run_dirs[0], "curves.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def points(rows, key):
    return [(r["step"], float(r[key])) for r in rows
            if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def draw(run_dirs, smoothing=0.8):
    """The figure plot_runs saves: per panel and run, its metric raw (thin) and smoothed (thick, labelled with the
    run), and Video-R1's first trainer's metric smoothed, dashed (labelled "RUN video_r1_first/"), where the run logged it."""
    runs = [(os.path.normpath(d), read_metrics(os.path.join(d, "metrics.jsonl"))) for d in run_dirs]
    fig, axes = plt.subplots(3, 3, figsize=(14, 10))
    for ax, (panel, title, first_key) in zip(axes.flat, PANELS):
        ax.set_title(title)
        drawn = False
        for k, (name, rows) in enumerate(runs):
            key, color = reward_key(name, rows, panel), f"C{k % 10}"
            if points(rows, key):
                steps, values = zip(*points(rows, key))
                ax.plot(steps, values, lw=0.7, alpha=0.35, color=color)
                ax.plot(steps, ema(values, smoothing), lw=2.0, color=color,
                        label=name if key == panel else f"{name} {key}")
                drawn = True
            if first_key and points(rows, first_key):
                steps, values = zip(*points(rows, first_key))
                ax.plot(steps, ema(values, smoothing), lw=1.2, ls="--", color=color, label=f"{name} video_r1_first/")
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"n/a\n(no {panel} in metrics.jsonl)", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or first_key:
            ax.legend(fontsize="small")
    fig.suptitle(" vs ".join(name for name, _ in runs) + f"  (thick: EMA {smoothing}, thin: raw, dashed: Video-R1's first trainer's rule)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    ap.add_argument("--output", default=None, help="png path (default: the first run's folder/curves.png)")
    ap.add_argument("--smoothing", type=float, default=0.8, help="EMA smoothing in [0, 1)")
    args = ap.parse_args()
    print(f"wrote {plot_runs(args.runs, args.output, args.smoothing)}")
