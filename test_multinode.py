"""
Two nodes simulated on one machine: two torchrun agents on localhost (one rank each, gloo) meet through the c10d
rendezvous exactly as two hosts would. Checked from what the run writes: it trains, the ranks' prompts are disjoint,
the metrics are means over both ranks, a checkpoint saves and a second two-agent launch resumes it exactly, and a
one-rank resume of that checkpoint is refused in one line.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

import datatools
import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
# torchrun runs a file: this one adds test_reliability's toy reward (shorter is better), so rewards differ between
# completions and ranks, and a mean over both ranks can be told from rank 0's own
WRAPPER = """
import sys
sys.path.insert(0, {here!r})
import rewards, train
rewards.REWARD_FUNCS["short"] = lambda completions, solutions=None: [max(0.0, 1 - len(c) / 200) for c in completions]
train.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    tiny.save_tiny_model(str(root / "model"), warm_start=False)
    train_path, _ = datatools.make_synthetic_dataset(str(root / "synthetic"), n_train=8, n_test=1)
    (root / "run.py").write_text(WRAPPER.format(here=HERE))
    return root, str(root / "model"), str(train_path)


def train_args(setup, out, *extra):
    root, model_dir, train_path = setup
    # 8 examples, 2 ranks x 2 prompts: 2 steps per epoch, so step 3 (after the resume) starts epoch 1
    return [str(root / "run.py"), "--tiny", "--model_name_or_path", model_dir, "--data", train_path,
            "--output_dir", str(out), "--rewards", "short", "--learning_rate", "1e-2", "--num_workers", "0",
            "--num_generations", "2", "--prompts_per_device", "2", "--max_completion_length", "16",
            "--max_steps", "3", "--save_steps", "2", "--log_samples_steps", "1", *extra]


def two_nodes(setup, out, *extra):
    """The documented command, once per node; on one machine both agents find the store at 127.0.0.1."""
    with socket.socket() as sock:  # a free port: a fixed one can still be held by an earlier run's store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test", *train_args(setup, out, *extra)]
    nodes = [subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, f"exit {node.returncode}:\n{log[-4000:]}"
    return logs


def rows(path):
    return [json.loads(line) for line in open(path)]


def test_two_nodes_train_on_disjoint_prompts_reduce_metrics_and_resume(setup):
    out = setup[0] / "run"
    two_nodes(setup, out)
    assert json.load(open(out / "run_config.json"))["world_size"] == 2
    metrics = rows(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3]
    samples = rows(out / "samples.jsonl")

    # every step has both ranks' rollouts (2 prompts x 2 completions each), on disjoint prompts; an epoch (steps 1-2)
    # covers the 8 examples once
    seen = {}
    for step in (1, 2, 3):
        by_rank = {r: {s["example"] for s in samples if s["step"] == step and s["rank"] == r} for r in (0, 1)}
        assert all(len(v) == 2 for v in by_rank.values()), by_rank
        assert not by_rank[0] & by_rank[1], f"step {step}: ranks share prompts {by_rank}"
        seen[step] = by_rank[0] | by_rank[1]
    assert seen[1] | seen[2] == set(range(8))

    # the logged reward is the mean over both ranks' completions, not rank 0's alone
    own_mean_differs = False
    for row in metrics:
        step_samples = [s for s in samples if s["step"] == row["step"]]
        both = sum(s["rewards"]["short"] for s in step_samples) / len(step_samples)
        rank0 = [s["rewards"]["short"] for s in step_samples if s["rank"] == 0]
        assert abs(row["reward"] - both) < 1e-6, (row["step"], row["reward"], both)
        own_mean_differs |= abs(sum(rank0) / len(rank0) - both) > 1e-6
    assert own_mean_differs, "rank 0's rewards equal both ranks' mean at every step: the check shows nothing"

    # the checkpoint holds both ranks' states; a second two-node launch resumes it (into another folder: the run
    # finished, so its own folder is not resumed) and redoes step 3 exactly
    state = out / "checkpoint-2" / "training_state"
    assert (state / "rank0.pt").exists() and (state / "rank1.pt").exists()
    assert json.load(open(state / "trainer_state.json")) == {"step": 2, "world_size": 2}
    again_out = setup[0] / "again"
    logs = two_nodes(setup, again_out, "--resume_from", str(out / "checkpoint-2"))
    assert any("resumed from" in log and "step 2, epoch 0, batch 2" in log for log in logs), logs[0][-3000:]
    again = rows(again_out / "metrics.jsonl")
    assert [r["step"] for r in again] == [3]
    for key in ("reward", "loss", "kl", "completion_length", "grad_norm", "lr"):
        assert abs(again[0][key] - metrics[2][key]) < 1e-5, (key, again[0][key], metrics[2][key])
    resumed = {s["example"] for s in rows(again_out / "samples.jsonl") if s["step"] == 3}
    assert resumed == seen[3]

    # one rank cannot take over a two-rank checkpoint: refused before any model loads
    proc = subprocess.run([sys.executable, *train_args(setup, setup[0] / "one_rank", "--resume_from",
                                                       str(out / "checkpoint-2"), "--max_steps", "4")],
                          cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --resume_from"), proc.stderr[-3000:]
    assert "saved by 2 ranks, this run has 1" in proc.stderr and "Traceback" not in proc.stderr
