"""
What clusters and users do to a run: SIGKILL and resume, SIGTERM, bad videos mid-run, non-finite losses, wrong
flags. Offline on CPU with the tiny model; the trainer runs in subprocesses.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")

# the toy reward of test_grpo.py (shorter is better): the random tiny model gets a learning signal, so losses,
# gradients and the schedule all matter for the comparison. NAN_AT makes the loss NaN at chosen steps; TERM_AT sends
# SIGTERM during a chosen step.
SCRIPT = """
import math, os, signal, sys, rewards, train
rewards.REWARD_FUNCS["short"] = lambda completions, solutions=None: [max(0.0, 1 - len(c) / 200) for c in completions]
nan_at = {int(s) for s in os.environ.get("NAN_AT", "").split(",") if s}
calls = [0]
grpo_loss = train.grpo_loss
def loss_with_nans(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ.get("TERM_AT", "0")):  # a pre-emption that lands inside that step
        os.kill(os.getpid(), signal.SIGTERM)
    loss, stats = grpo_loss(*args, **kwargs)
    return (loss * math.nan if calls[0] in nan_at else loss), stats
train.grpo_loss = loss_with_nans
train.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    tiny.save_tiny_model(str(root / "model"), warm_start=False)
    train_path, _ = data.make_synthetic_dataset(str(root / "synthetic"), n_train=12, n_test=1)
    return root, str(root / "model"), str(train_path)


def args(setup, out, *extra):
    root, model_dir, train_path = setup
    return [sys.executable, "-c", SCRIPT, "--tiny", "--model_name_or_path", model_dir, "--data", train_path,
            "--output_dir", str(out), "--rewards", "short", "--learning_rate", "1e-2", "--num_workers", "1",
            "--num_generations", "4", "--prompts_per_device", "2",
            "--max_steps", "8", "--save_steps", "4", "--log_samples_steps", "0", *extra]


def run(cmd, env=None, expect=0):
    proc = subprocess.run(cmd, cwd=HERE, env=env or ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_sigkill_then_resume_gives_the_same_run(setup):
    root = setup[0]
    run(args(setup, root / "straight"))
    # 8 steps, 12 examples at 2 prompts a step: the resumed part crosses an epoch boundary too
    proc = subprocess.Popen(args(setup, root / "killed"), cwd=HERE, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = root / "killed" / "checkpoint-4" / "training_state" / "trainer_state.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    run(args(setup, root / "killed", "--resume_from", "latest"))
    straight, resumed = metrics(root / "straight"), metrics(root / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight[4:], resumed[4:]):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"], (a, b)
        for key in ("loss", "kl", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert len({r["reward"] for r in straight[4:]}) > 1  # the rows compared are not all alike


def test_lora_run_resumes_exactly_and_final_is_a_merged_model(setup):
    # LoRA: KL exactly 0 at step 1 (reference = adapters off), adapter checkpoints, exact resume, final/ a merged HF model
    root, model_dir, train_path = setup
    lora = ("--lora_rank", "8", "--max_steps", "4", "--save_steps", "2")
    run(args(setup, root / "lora", *lora))
    run(args(setup, root / "lora-resumed", *lora, "--resume_from", str(root / "lora" / "checkpoint-2")))
    straight, resumed = metrics(root / "lora"), metrics(root / "lora-resumed")
    assert straight[0]["kl"] == 0.0 and straight[-1]["kl"] > 0
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"], (a, b)
        for key in ("loss", "kl", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert (root / "lora" / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (root / "lora" / "checkpoint-2" / "model.safetensors").exists()  # the adapter, not the whole model
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    final = root / "lora" / "final"
    merged = AutoModelForImageTextToText.from_pretrained(str(final))
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dir), str(final / "adapter"))
    base = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    expected = adapted.merge_and_unload().state_dict()
    changed = 0
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
        changed += name.endswith("q_proj.weight") and not torch.equal(value, base[name])
    assert changed == merged.config.text_config.num_hidden_layers  # training moved every adapted layer
    proc = run([sys.executable, "eval.py", "--model", str(final), "--data", train_path, "--limit", "2",
                "--max_new_tokens", "8", "--num_workers", "0", "--output", str(root / "lora-eval.json"), "--max_pixels",
                str(112 * 112), "--min_pixels", str(112 * 112), "--max_frames", "4"])
    assert json.loads((root / "lora-eval.json").read_text())["n"] == 2, proc.stderr[-2000:]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(setup):
    out = setup[0] / "term"
    proc = subprocess.Popen(args(setup, out, "--save_steps", "0", "--max_steps", "8"), cwd=HERE, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not open(out / "metrics.jsonl").read().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-2000:]
    assert "SIGTERM: saved" in stdout
    saved = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert len(saved) == 1 and not (out / "final").exists()
    run(args(setup, out, "--save_steps", "0", "--max_steps", "8", "--resume_from", "latest"))
    assert [r["step"] for r in metrics(out)] == list(range(1, 9)) and (out / "final").exists()


@pytest.fixture(scope="module")
def last_step_run(setup):
    """One run serves two tests: SIGTERM lands in its last step, and a stale DeepSpeed build lock lies in its
    TORCH_EXTENSIONS_DIR (the two do not meet: the lock would hang the start, the signal comes at the end)."""
    out, extensions = setup[0] / "term_last", setup[0] / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").write_text("")
    proc = run(args(setup, out, "--save_steps", "0", "--max_steps", "2"),
               env=dict(ENV, TERM_AT="2", TORCH_EXTENSIONS_DIR=str(extensions)))
    return out, proc, extensions


def test_sigterm_in_the_last_step_writes_final(last_step_run):
    out, proc, _ = last_step_run
    assert (out / "final" / "config.json").exists() and f"done: {out}/final" in proc.stdout, proc.stdout[-2000:]
    assert "SIGTERM: saved" not in proc.stdout and not list(out.glob("checkpoint-*"))
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_a_save_keeps_itself_and_drops_the_abandoned_runs_newer_checkpoints(tmp_path, monkeypatch):
    # resumed from checkpoint-2 while the abandoned run's checkpoint-4 lies beside it: saving checkpoint-3 with
    # --save_total_limit 1 keeps checkpoint-3, and `latest` is it
    import checkpoint

    class Engine:
        def save_checkpoint(self, path, tag):
            os.makedirs(os.path.join(path, tag))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    for step in (2, 4, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_text("weights")
        checkpoint.save(Engine(), str(tmp_path / f"checkpoint-{step}"), step, (0, step), 0, save_total_limit=1)
    assert checkpoint.find(str(tmp_path), "latest") == str(tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / "checkpoint-2" / "training_state").exists()  # rotated: only the model files stay


def test_a_stale_extension_lock_does_not_hang_a_run(last_step_run):
    # a run killed while DeepSpeed JIT-built its CPU all-reduce op left torch's lock file: a later run that built the
    # op would wait on it forever (FileBaton has no timeout). The op is not built (runtime.skip_cpu_allreduce_build).
    out, proc, extensions = last_step_run  # the run exited 0 within run()'s timeout
    assert proc.returncode == 0 and (out / "final").exists(), proc.stderr[-2000:]
    assert os.listdir(extensions / "deepspeed_shm_comm") == ["lock"]  # nothing was built there


def test_an_existing_run_is_not_overwritten(setup, capsys, monkeypatch):
    # in-process (refused in validate_config, before anything distributed or any model), SCRIPT's reward registered
    import rewards
    import train
    monkeypatch.setitem(rewards.REWARD_FUNCS, "short", lambda completions, solutions=None: [0.0 for _ in completions])
    out = setup[0] / "existing"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as exit_info:  # any other exception (a traceback) fails here
        train.main(args(setup, out)[3:])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:"), err
    assert "holds a run already" in err and "--overwrite_output_dir" in err
    assert "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched


def test_resume_on_another_number_of_ranks_is_refused_in_one_line(setup):
    # a checkpoint saved by 2 ranks, resumed by 1: refused before any model loads (the real 2-rank checkpoint is
    # refused the same way in test_multinode.py)
    out = setup[0] / "two_ranks"
    (out / "checkpoint-4" / "training_state").mkdir(parents=True)
    (out / "checkpoint-4" / "training_state" / "trainer_state.json").write_text('{"step": 4, "world_size": 2}')
    proc = run(args(setup, out, "--resume_from", "latest"), expect=2)
    assert proc.stderr.startswith("error: --resume_from") and "saved by 2 ranks, this run has 1" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "resumed from" not in proc.stdout
    assert not (out / "metrics.jsonl").exists()


def test_corrupt_video_mid_run_is_skipped_and_counted(setup):
    root, model_dir, train_path = setup
    rows = [json.loads(line) for line in open(train_path)]
    bad_video = root / "synthetic" / "corrupt.mp4"
    bad_video.write_bytes(os.urandom(3000))
    rows[0] = dict(rows[0], video_filename=str(bad_video))
    path = root / "synthetic" / "with_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "bad_data"
    # also --mask_truncated_completions with 8 tokens (most completions truncated): truncated ones leave the loss but
    # are still scored on their text (scored as "" they would all get the toy reward's 1.0)
    proc = run(args(setup, out, "--data", str(path), "--max_steps", "6", "--save_steps", "0",
                    "--mask_truncated_completions", "--max_completion_length", "8"))
    assert "corrupt.mp4" in proc.stderr
    rows = metrics(out)
    assert len(rows) == 6 and sum(r["skipped_examples"] for r in rows) >= 1
    assert all(r["truncated_ratio"] > 0.5 and r["reward"] < 0.95 and r["completion_length"] > 4 for r in rows), rows


def test_mostly_bad_videos_stop_the_run_with_a_clear_error(setup):
    root, model_dir, train_path = setup
    rows = [json.loads(line) for line in open(train_path)]
    for i, r in enumerate(rows[:9]):
        bad = root / "synthetic" / f"bad{i}.mp4"
        bad.write_bytes(b"not a video")
        r["video_filename"] = str(bad)
    path = root / "synthetic" / "mostly_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run(args(setup, root / "mostly_bad", "--data", str(path), "--max_steps", "20", "--skip_window", "3"), expect=1)
    assert "failed to load" in proc.stderr


def test_nan_loss_skips_the_update_then_stops_after_several(setup):
    # NaN at steps 2, 4, 5, 6: step 2's update is skipped and training goes on; 4-6 are three in a row: stop
    out = setup[0] / "nan"
    proc = run(args(setup, out, "--save_steps", "0"), env=dict(ENV, NAN_AT="2,4,5,6"), expect=1)
    assert [r["skipped_update"] for r in metrics(out)] == [0, 1, 0, 1, 1]
    assert "step 6: 3 updates in a row skipped" in proc.stderr and "Likely causes" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--num_generations", "1"], "at least 2"),
    (["--rewards", "accuracy,shiny"], "unknown ['shiny']; known:"),
    (["--loss_type", "ppo"], "--loss_type 'ppo'"),
    (["--data", "/nonexistent/train.jsonl"], "/nonexistent/train.jsonl: no such file"),
    (["--video_root", "/nonexistent/videos"], "/nonexistent/videos: no such folder"),
    (["--model_name_or_path", "./models/qwen-missing"], "hf download"),
    (["--deepspeed", "missing_ds.json"], "missing_ds.json: no such file"),
    (["--reward_weights", "1,2,3"], "one weight per reward"),
    (["--max_pixels", "-1"], "--max_pixels -1"),
    (["--deepspeed", "ds_with_batch.json"], "sets ['train_batch_size']; these come from train.py's flags"),
    (["--model_name_or_path", "qwen2-text"], "model_type 'qwen2' is not supported; supported: qwen2_vl, qwen2_5_vl"),
    (["--model_name_or_path", "llava"], "model_type 'llava' is not supported; supported: qwen2_vl, qwen2_5_vl"),
    (["--tiny_model", "qwen9-vl"], "--tiny_model 'qwen9-vl': choose one of qwen2-vl, qwen2.5-vl, qwen3-vl"),
    (["--lora_rank", "8", "--lora_target_modules", "q_proj,qkvz"], "['qkvz'] match no Linear module; the language model has ["),
    (["--lora_rank", "-1"], "--lora_rank -1: 0 (off) or a positive rank"),
])
def test_bad_flags_fail_fast_with_one_line(setup, flags, message, capsys):
    # in-process: validation runs before anything distributed or any model is touched
    import train
    (setup[0] / "ds_with_batch.json").write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 3}}')
    for name, model_type in (("qwen2-text", "qwen2"), ("llava", "llava")):  # model folders of other families
        (setup[0] / name).mkdir(exist_ok=True)
        (setup[0] / name / "config.json").write_text(json.dumps({"model_type": model_type}))
    flags = [str(setup[0] / f) if f in ("ds_with_batch.json", "qwen2-text", "llava") else f for f in flags]
    out = setup[0] / "never"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(setup, out, "--rewards", "accuracy,format", *flags)[3:])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.startswith("error:"), err
    assert not out.exists()
