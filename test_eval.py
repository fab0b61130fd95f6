"""
Tests of eval.py and plot.py: offline, CPU, a tiny random Qwen2-VL and a 6-video synthetic test split.

    .venv/bin/pytest -q test_eval.py
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import data
import datatools
import eval as ev
import plot
import rewards
import tiny
import train
from model import completion_mask, decode_completions

REPO = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def setup(tmp_path_factory, warm_tiny_model):
    root = tmp_path_factory.mktemp("eval")
    model_dir = warm_tiny_model(root / "tiny-qwen2-vl")
    _, test_path = datatools.make_synthetic_dataset(root / "synthetic", n_train=2, n_test=6, seed=0)
    return {"root": root, "model": model_dir, "data": str(test_path)}


def make_cfg(setup, data_path=None, **flags):
    argv = ["--tiny", "--model", setup["model"], "--data", data_path or setup["data"], "--max_new_tokens", "24",
            "--batch_size", "4", "--num_workers", "0"]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    return ev.parse_config(argv)


def run_eval(cfg, output):
    rows = ev.load_rows(cfg.data, cfg.video_root or None)
    return ev.evaluate(cfg, cfg.model[0], rows, str(output))


def test_tiny_preset_uses_training_video_settings(setup):
    cfg = make_cfg(setup)
    assert (cfg.max_frames, cfg.min_pixels, cfg.max_pixels) == (tiny.TRAIN_PRESET["max_frames"], tiny.TRAIN_PRESET["min_pixels"], tiny.TRAIN_PRESET["max_pixels"])
    assert cfg.fps == train.Config.fps and cfg.max_new_tokens == 24  # explicit flags win over the preset
    plain = ev.parse_config(["--model", "m", "--data", "d.jsonl"])
    assert (plain.fps, plain.min_frames, plain.max_frames, plain.min_pixels, plain.max_pixels, plain.max_new_tokens) == \
        (train.Config.fps, train.Config.min_frames, train.Config.max_frames, train.Config.min_pixels, train.Config.max_pixels, 512)


def test_eval_imports_no_trainer():
    # what eval.py shares with train.py lives where both import it (model.py, tiny.py, data.py), not in the trainer
    code = "import eval, sys; assert 'train' not in sys.modules, 'eval.py imports train.py'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_shared_flags_default_as_in_training():
    # a flag both entry points have (video sampling, prompt length, workers, compiled decode) has one default
    from dataclasses import fields
    evals, trains = ({f.name: f.default for f in fields(c)} for c in (ev.Config, train.Config))
    shared = sorted(set(evals) & set(trains) - {"data"})  # eval's --data is a test split, training's a train file
    assert {"fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "max_prompt_length", "num_workers",
            "compile_rollout"} <= set(shared)
    assert {k: evals[k] for k in shared} == {k: trains[k] for k in shared}


def test_score_is_the_training_reward(setup):
    from transformers import AutoTokenizer
    import torch
    tok = AutoTokenizer.from_pretrained(setup["model"])
    good = "<think>I see three red squares.</think><answer>3</answer>"
    r = ev.score(good, "<answer>3</answer>", 11, tok)
    assert r["correct"] is True and r["format"] is True and r["answer"] == "3" and r["completion_length"] == 11
    assert r["thinking_length"] == len(tok("I see three red squares.", add_special_tokens=False)["input_ids"]) > 0
    for out in ("3", "<answer>3</answer>", "<think>3</think>", "<think>x</think><answer>4</answer>", "<answer>3</answer> trailing"):
        r = ev.score(out, "<answer>3</answer>", 1, tok)
        assert r["correct"] == (rewards.accuracy_reward([out], ["<answer>3</answer>"])[0] == 1.0)
        assert r["format"] == (rewards.format_reward([out])[0] == 1.0)
    # decoding stops at the first EOS, whatever follows it
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([tok("<answer>3</answer>", add_special_tokens=False)["input_ids"] + [eos, 0, 5, 7]])
    mask = completion_mask(ids, [eos])
    assert decode_completions(tok, ids, mask) == ["<answer>3</answer>"]


def test_score_gives_the_accuracy_reward_the_rows_columns():
    # eval scores as training does: the row's columns by name (problem_type, options; the others ignored), so "B. blue"
    # is option B of a multiple-choice row, and a wrong number for a numerical one
    tok = tiny.build_tiny_tokenizer()
    out = "<think>x</think><answer>B. blue</answer>"
    mc = {"problem_type": "multiple choice", "options": ["A. red", "B. blue"], "data_source": "LLaVA-Video-178K/x"}
    assert ev.score(out, "<answer>B</answer>", 1, tok, columns=mc)["correct"] is True
    assert ev.score(out, "<answer>B</answer>", 1, tok, columns={"problem_type": "numerical"})["correct"] is False
    assert ev.score(out, "<answer>B</answer>", 1, tok)["correct"] is False  # no columns: numerical, as training's default


def test_eval_json_is_consistent(setup, tmp_path):
    out = tmp_path / "res.json"
    summary = run_eval(make_cfg(setup), out)
    saved = json.loads(out.read_text())
    assert saved == summary
    assert saved["n"] == 6 and saved["skipped"] == [] and saved["model"] == setup["model"] and saved["data"] == setup["data"]
    results = saved["results"]
    assert [r["index"] for r in results] == [1, 2, 3, 4, 5, 6]
    for r in results:
        assert set(r) >= {"video", "problem", "solution", "output", "answer", "correct", "format", "completion_length"}
        assert r["correct"] == (rewards.accuracy_reward([r["output"]], [r["solution"]])[0] == 1.0)
        assert r["format"] == (rewards.format_reward([r["output"]])[0] == 1.0)
        assert r["answer"] == rewards.extract_answer(r["output"])
        assert 1 <= r["completion_length"] <= 24
    n = len(results)
    assert saved["accuracy"] == pytest.approx(sum(r["correct"] for r in results) / n)
    assert saved["format_rate"] == pytest.approx(sum(r["format"] for r in results) / n)
    assert saved["mean_completion_length"] == pytest.approx(sum(r["completion_length"] for r in results) / n)
    assert saved["mean_thinking_length"] == pytest.approx(sum(r["thinking_length"] for r in results) / n)
    table = ev.format_table([saved, {**saved, "model": "other/model"}])
    assert setup["model"] in table.splitlines()[0] and "other/model" in table.splitlines()[0]


def test_resume_gives_the_same_file(setup, tmp_path):
    cfg = make_cfg(setup, batch_size=2)
    run_eval(cfg, tmp_path / "full.json")
    full = json.loads((tmp_path / "full.json").read_text())
    lines = (tmp_path / "full.partial.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 6  # header + one line per example
    # interrupted after 3 examples, in the middle of writing the 4th
    (tmp_path / "resumed.partial.jsonl").write_text("".join(lines[:4]) + lines[4][:40])
    resumed = run_eval(cfg, tmp_path / "resumed.json")
    assert resumed == json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["results"] == full["results"] and {k: v for k, v in resumed.items() if k != "results"} == \
        {k: v for k, v in full.items() if k != "results"}
    # a completed evaluation re-run is read back, not recomputed; other settings refuse to mix in
    assert run_eval(cfg, tmp_path / "resumed.json") == full
    with pytest.raises(ValueError, match="resumed.partial.jsonl.*max_new_tokens"):
        run_eval(make_cfg(setup, batch_size=2, max_new_tokens=8), tmp_path / "resumed.json")


def test_bad_rows_and_videos_are_skipped_with_reasons(setup, tmp_path):
    videos = Path(setup["data"]).parent / "videos"
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4096))
    good = {"problem": "How many objects are there in total?", "solution": "<answer>2</answer>"}
    lines = [json.dumps({"video_filename": str(videos / "test_00000.mp4"), **good}),
             '{"video_filename": "broken',                                             # invalid JSON
             json.dumps({"video_filename": "no/such/video.mp4", **good}),              # missing video
             json.dumps({"video_filename": str(videos / "test_00001.mp4"), "solution": "<answer>1</answer>"}),  # no problem
             "",                                                                      # blank lines are not rows
             json.dumps({"video_filename": "corrupt.mp4", **good}),                   # random bytes
             json.dumps({"video_filename": str(videos / "test_00002.mp4"), **good})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    summary = run_eval(make_cfg(setup, data_path=str(bad)), tmp_path / "bad.json")
    assert summary["n"] == 2 and [r["index"] for r in summary["results"]] == [1, 7]
    reasons = {s["index"]: s["reason"] for s in summary["skipped"]}
    assert sorted(reasons) == [2, 3, 4, 6] and len(summary["skipped"]) == 4
    assert "invalid JSON" in reasons[2]
    assert "not found" in reasons[3] and "no/such/video.mp4" in reasons[3]
    assert "'problem'" in reasons[4]
    assert "corrupt.mp4" in reasons[6] and "cannot open" in reasons[6]
    assert summary["skipped"][-1]["video"] == str(tmp_path / "corrupt.mp4")
    assert "row 6" in ev.format_table([summary])


def test_format_table_summarises_many_skipped_rows():
    # a data file of thousands of bad rows: the table ends with 3 examples per reason and a count each, not a line per row
    skipped = [{"index": i, "video": f"/v/{i}.mp4", "reason": f"video file not found: /v/{i}.mp4"} for i in range(1, 1001)]
    skipped += [{"index": i, "video": None, "reason": "invalid JSON (Expecting value)"} for i in range(1001, 1501)]
    summary = {"model": "m", "accuracy": 0.5, "format_rate": 1.0, "mean_completion_length": 9.0,
               "mean_thinking_length": 3.0, "n": 2, "skipped": skipped}
    lines = ev.format_table([summary]).splitlines()
    tail = [line for line in lines if line.startswith("skipped (m): ")]
    assert len(tail) == 3 + 3 + 2, tail
    assert "skipped (m): row 1: video file not found: /v/1.mp4" in tail
    assert "skipped (m): 1000 rows: video file not found: <video> (the first 3 above)" in tail
    assert "skipped (m): 500 rows: invalid JSON (Expecting value) (the first 3 above)" in tail
    assert any(line.startswith("examples skipped") and line.endswith("1500") for line in lines)


def test_accuracy_per_problem_type(setup, tmp_path):
    # a mixed file: 3 counting rows and 3 multiple-choice rows about the same clips
    folder = Path(setup["data"]).parent
    mixed = tmp_path / "mixed.jsonl"
    lines = (folder / "test.jsonl").read_text().splitlines()[:3] + (folder / "test_mc.jsonl").read_text().splitlines()[:3]
    mixed.write_text("\n".join(lines) + "\n")
    summary = run_eval(make_cfg(setup, data_path=str(mixed), video_root=str(folder)), tmp_path / "mixed.json")
    assert summary["n"] == 6 and [r["problem_type"] for r in summary["results"]] == ["numerical"] * 3 + ["multiple choice"] * 3
    options = [json.loads(line).get("options") for line in lines]
    for r, opts in zip(summary["results"], options):  # each row scored by its own type and options
        assert r["correct"] == (rewards.accuracy_reward([r["output"]], [r["solution"]], problem_type=[r["problem_type"]],
                                                        options=[opts])[0] == 1.0)
    for t in ("numerical", "multiple choice"):
        of_type = [r["correct"] for r in summary["results"] if r["problem_type"] == t]
        assert summary["accuracy_by_type"][t] == pytest.approx(sum(of_type) / 3)
    # per-type means from records alone (the tiny model answers numbers, so its multiple-choice accuracy is 0)
    records = [{"index": i, "video": "v", "problem_type": t, "correct": c, "format": True, "completion_length": 1,
                "thinking_length": 0} for i, (t, c) in enumerate([("multiple choice", True), ("multiple choice", False),
                                                                   ("free-form", True), ("numerical", False)])]
    fake = ev.summarize("m", "d", records)
    assert fake["accuracy"] == 0.5 and fake["accuracy_by_type"] == {"free-form": 1.0, "multiple choice": 0.5, "numerical": 0.0}
    table = ev.format_table([fake, summary]).splitlines()
    row = next(line for line in table if line.strip().startswith("multiple choice (%)"))
    assert row.split()[-2:] == ["50.0", f"{100 * summary['accuracy_by_type']['multiple choice']:.1f}"]
    assert next(line for line in table if line.strip().startswith("free-form (%)")).split()[-1] == "n/a"


def test_plot_writes_png(tmp_path):
    rows = [{"step": s, "reward": 0.1 * s, "reward_std": 0.2, "rewards/accuracy": 0.05 * s, "kl": 0.001 * s,
             "completion_length": 100 + 5 * s, "grad_norm": float("nan")} for s in range(1, 9)]  # no rewards/format
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "rew')
    png = plot.plot_run(str(tmp_path))
    assert png == str(tmp_path / "curves.png")
    content = Path(png).read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 5000


def test_plot_overlays_runs(tmp_path):
    # a default run, a run of Video-R1's first recipe (--rewards video_r1_first_accuracy,video_r1_format) and one without video_r1_first/ metrics: each run
    # draws its own accuracy and format rewards, the video_r1_first/ ones dashed where it logged them
    runs = {"7b": ("accuracy,format", ["rewards/accuracy", "rewards/format", "video_r1_first/rewards/accuracy_reward"]),
            "first": ("video_r1_first_accuracy,video_r1_format", ["rewards/video_r1_first_accuracy", "rewards/video_r1_format",
                                                   "video_r1_first/rewards/accuracy_reward", "video_r1_first/rewards/format_reward"]),
            "2b": ("accuracy", ["rewards/accuracy"])}
    for name, (reward_names, keys) in runs.items():
        (tmp_path / name).mkdir()
        rows = [{"step": s, "thinking_length": 30 * s, **{k: 0.05 * s for k in keys}} for s in range(1, 9)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if name != "2b":  # without run_config.json the logged rewards/* keys name the rewards
            (tmp_path / name / "run_config.json").write_text(json.dumps({"rewards": reward_names}))
    dirs = [str(tmp_path / name) for name in runs]
    fig = plot.draw(dirs)
    accuracy_ax, format_ax, _, thinking_ax = fig.axes[:4]
    labels = lambda ax: [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]  # noqa: E731
    a, s, b = (os.path.normpath(d) for d in dirs)
    assert labels(accuracy_ax) == [a, f"{a} video_r1_first/", f"{s} rewards/video_r1_first_accuracy", f"{s} video_r1_first/", b]
    assert labels(format_ax) == [a, f"{s} rewards/video_r1_format", f"{s} video_r1_first/"]
    assert labels(thinking_ax) == [a, s, b]
    assert len(accuracy_ax.get_lines()) == 8 and len(thinking_ax.get_lines()) == 6  # raw + EMA per run, EMA per video_r1_first/
    assert [t.get_text() for t in accuracy_ax.get_legend().get_texts()] == labels(accuracy_ax)
    assert [line.get_linestyle() for line in accuracy_ax.get_lines()].count("--") == 2
    import matplotlib.pyplot as plt
    plt.close(fig)
    png = plot.plot_runs(dirs[:2])
    assert png == str(tmp_path / "7b" / "curves.png") and Path(png).read_bytes()[:4] == b"\x89PNG"
    assert [key for key, *_ in plot.PANELS[:4]] == ["rewards/accuracy", "rewards/format", "completion_length", "thinking_length"]
    assert {"empty_thinking_ratio", "answer_entropy"} <= {key for key, *_ in plot.PANELS}
    proc = subprocess.run([sys.executable, str(REPO / "plot.py"), *dirs[:2],
                           "--output", str(tmp_path / "both.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG" and "both.png" in proc.stdout


def test_missing_model_or_data_is_one_error_line(setup, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.json").write_text("[{not json")
    monkeypatch.chdir(tmp_path)
    flags = ["--max_new_tokens", "4", "--num_workers", "0"]
    for argv, message in (
            (["--model", "runs/nope", "--data", setup["data"]], "error: --model runs/nope: no such folder"),
            (["--model", str(tmp_path / "gone"), "--data", setup["data"]], f"error: --model {tmp_path / 'gone'}: no such folder"),
            (["--tiny", "--model", setup["model"], "--data", "nope.jsonl"], "error: --data nope.jsonl: no such file"),
            (["--model", setup["model"], "--data", "empty.jsonl"], "error: load_examples: no usable row in empty.jsonl"),
            (["--model", setup["model"], "--data", "broken.json"], "error: load_examples: broken.json is not valid JSON")):
        with pytest.raises(SystemExit) as exit_info:
            ev.main(argv + flags)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["broken.json", "empty.jsonl", "runs"]  # --tiny made no data in the cwd


def test_cli_tiny_smoke(setup, tmp_path):
    # --tiny reads data/tiny-qwen2-vl and data/synthetic under the working directory: point them at the fixture
    (tmp_path / "data").mkdir()
    os.symlink(setup["model"], tmp_path / "data" / "tiny-qwen2-vl")
    os.symlink(Path(setup["data"]).parent, tmp_path / "data" / "synthetic")
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--tiny", "--max_new_tokens", "8", "--limit", "4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "results" / "data_tiny-qwen2-vl-test.json").read_text())
    assert saved["n"] == 4 and saved["skipped"] == [] and all(r["completion_length"] <= 8 for r in saved["results"])
    assert "accuracy (%)" in proc.stdout and "examples evaluated" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# --protocol video-r1-first: Video-R1's first eval script

# (output, solution, Video-R1's first trainer's parsed answer, first correct, ours correct)
VIDEO_R1_FIRST_PARSER_CASES = [
    ("<think>a</think><answer>3</answer>", "<answer>3</answer>", 3, True, True),
    ("<answer> 3 </answer>", "<answer>3</answer>", 3, True, True),
    ("<answer>\n3\n</answer>", "<answer>3</answer>", 3, True, True),
    ("<answer>03</answer>", "<answer>3</answer>", 3, True, True),
    ("<answer>3.0</answer>", "<answer>3</answer>", None, False, True),        # not digits only
    ("<answer>2</answer><answer>3</answer>", "<answer>3</answer>", 2, False, True),  # first: first; ours: last
    ("<answer>3</answer><answer>2</answer>", "<answer>3</answer>", 3, True, False),
    ("<answer>x</answer> <answer>3</answer>", "<answer>3</answer>", 3, True, True),  # first *match*, not first block
    ("<answer>3 apples</answer>", "<answer>3</answer>", None, False, False),
    ("<answer>-3</answer>", "<answer>-3</answer>", None, False, True),       # no sign: Video-R1's first trainer never scores it
    ("3", "<answer>3</answer>", None, False, False),
    ("<answer>3</answer>", "3", 3, False, True),                             # an untagged solution parses to None
]


@pytest.mark.parametrize("output,solution,answer,first_ok,ours_ok", VIDEO_R1_FIRST_PARSER_CASES)
def test_video_r1_first_protocol_parser(setup, output, solution, answer, first_ok, ours_ok):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(setup["model"])
    assert ev.video_r1_first_number(output) == answer
    first, ours = ev.score(output, solution, 1, tok, "video-r1-first"), ev.score(output, solution, 1, tok)
    assert (first["answer"], first["correct"]) == (answer, first_ok)
    assert ours["correct"] == ours_ok and first["format"] == ours["format"]


def test_video_r1_first_protocol_prompt_byte_for_byte(setup):
    from transformers import AutoTokenizer
    # Video-R1's first trainer's src/eval/test_qwen2vl_video_counting.py, character for character
    first_template = ("{Question} First output the thinking process in <think> </think> and final answer (number) "
                     "in <answer> </answer> tags.")
    problem = "How many red metal cubes are there?"
    assert ev.VIDEO_R1_FIRST_PROMPT_TEMPLATE.format(problem=problem).encode() == first_template.format(Question=problem).encode()
    assert data.PROMPT_TEMPLATE.format(problem=problem) != first_template.format(Question=problem)
    tok = AutoTokenizer.from_pretrained(setup["model"])
    text = data.build_prompt_text(tok, problem, template=ev.VIDEO_R1_FIRST_PROMPT_TEMPLATE)
    assert first_template.format(Question=problem) in text and data.build_prompt_text(tok, problem) != text


def test_video_r1_first_protocol_flags():
    first = ev.parse_config(["--model", "m", "--data", "d.jsonl", "--protocol", "video-r1-first"])
    assert first.protocol == "video-r1-first" and first.max_new_tokens == 256
    assert ev.parse_config(["--tiny", "--protocol", "video-r1-first"]).max_new_tokens == 256
    assert ev.parse_config(["--model", "m", "--data", "d", "--protocol", "video-r1-first", "--max_new_tokens", "9"]).max_new_tokens == 9
    assert ev.parse_config(["--model", "m", "--data", "d"]).protocol == "train"
    with pytest.raises(SystemExit):
        ev.parse_config(["--model", "m", "--data", "d", "--protocol", "paper"])


def test_video_r1_first_protocol_run_names_it_and_uses_the_checkpoints_penalty(setup, tmp_path):
    import shutil
    model_dir = tmp_path / "penalised"
    shutil.copytree(setup["model"], model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.05}))
    cfg = make_cfg(setup, protocol="video-r1-first", limit=2)
    cfg.model = [str(model_dir)]
    rows = ev.load_rows(cfg.data)[:2]
    saved = ev.evaluate(cfg, str(model_dir), rows, str(tmp_path / "first.json"))
    assert saved["protocol"] == "video-r1-first" and saved["repetition_penalty"] == 1.05 and saved["n"] == 2
    for r in saved["results"]:
        assert r["answer"] == ev.video_r1_first_number(r["output"])
        assert r["correct"] == (r["answer"] is not None and r["answer"] == ev.video_r1_first_number(r["solution"]))
    assert "video-r1-first (penalty 1.05)" in ev.format_table([saved])
    header = json.loads((tmp_path / "first.partial.jsonl").read_text().splitlines()[0])["header"]
    assert header["protocol"] == "video-r1-first" and header["repetition_penalty"] == 1.05


def test_cli_tiny_video_r1_first_protocol(setup, tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(setup["model"], tmp_path / "data" / "tiny-qwen2-vl")
    os.symlink(Path(setup["data"]).parent, tmp_path / "data" / "synthetic")
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--tiny", "--protocol", "video-r1-first", "--max_new_tokens", "8",
                           "--limit", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "results" / "data_tiny-qwen2-vl-test.json").read_text())
    assert saved["protocol"] == "video-r1-first" and saved["n"] == 2 and "video-r1-first (penalty" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# --protocol video-r1: Video-R1's eval_bench.py on files in its released layout

# the six files Video-R1 released (Video-R1-eval), each a JSON list in the 260k layout with paths relative to the
# file; here two rows each about the synthetic clips, with the type mix of each benchmark and one unreadable video
VIDEO_R1_BENCHMARKS = {"mvbench": ("multiple choice", "multiple choice"), "tempcompass": ("multiple choice", "multiple choice"),
                       "videomme": ("multiple choice", "multiple choice"), "videommmu": ("multiple choice", "numerical"),
                       "vsibench": ("multiple choice", "regression"), "mmvu": ("multiple choice", "free-form")}


@pytest.fixture(scope="module")
def video_r1_files(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("Evaluation")
    rows = json.loads((Path(setup["data"]).parent / "test_260k.json").read_text())
    by_type = {}
    for r in rows:
        by_type.setdefault(r["problem_type"], r)
    for i, (name, types) in enumerate(VIDEO_R1_BENCHMARKS.items()):
        (root / name).mkdir()
        out = []
        for j, t in enumerate(types):
            row = dict(by_type[t], problem_id=j + 1, data_source=name)
            video = Path(setup["data"]).parent / row["path"]
            os.symlink(video, root / name / f"{j}.mp4")
            out.append(dict(row, path=f"./{name}/{j}.mp4"))
        if name == "videomme":
            out[1]["path"] = "./videomme/missing.mp4"  # eval_bench.py scores an unreadable video as wrong
        (root / f"eval_{name}.json").write_text(json.dumps(out, indent=2))
    return root


def video_r1_argv(setup, folder, output, *more):
    return ["--tiny", "--model", setup["model"], "--protocol", "video-r1", "--data", str(folder), "--output", str(output),
            "--max_new_tokens", "8", "--batch_size", "1", "--num_workers", "0", *more]


def test_video_r1_protocol_flags(setup, video_r1_files):
    cfg = ev.parse_config(["--model", "m", "--protocol", "video-r1", "--data", str(video_r1_files)])
    assert (cfg.max_new_tokens, cfg.max_prompt_length) == (1024, 16384) and ev.VIDEO_R1_SAMPLING == {"temperature": 0.1, "top_p": 0.001}
    assert [Path(d).name for d in cfg.data] == sorted(f"eval_{n}.json" for n in VIDEO_R1_BENCHMARKS)
    assert (cfg.fps, cfg.min_frames, cfg.max_frames, cfg.min_pixels, cfg.max_pixels) == (2.0, 4, 16, 0, 0)  # its reader's
    two = ev.parse_config(["--model", "m", "--protocol", "video-r1", "--data", "a.json", "b.json"])
    assert two.data == ["a.json", "b.json"]
    assert ev.video_r1_output_paths(two) == [[os.path.join("results", "video-r1", "m", f) for f in ("a_output.json", "b_output.json")]]
    two.output = "out"
    assert ev.video_r1_output_paths(two) == [[os.path.join("out", "a_output.json"), os.path.join("out", "b_output.json")]]
    assert ev.parse_config(["--tiny", "--protocol", "video-r1"]).data == [os.path.join("data", "synthetic", "test_260k.json")]
    with pytest.raises(SystemExit):
        ev.parse_config(["--model", "m", "--data", "a.json", "b.json"])  # several files: only with --protocol video-r1
    with pytest.raises(SystemExit):
        ev.parse_config(["--model", "m", "--data", "a.json", "--prompt_template", "r1"])


KILL_AFTER = """
import os, sys, eval as ev
calls, write = [0], ev.write_json
def write_then_die(path, obj):
    write(path, obj)
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AFTER"]):
        os._exit(9)  # killed between two batches of the second benchmark
ev.write_json = write_then_die
ev.main(sys.argv[1:])
"""


def test_video_r1_protocol_scores_each_benchmark_and_resumes_after_a_kill(setup, video_r1_files, tmp_path, capsys):
    whole = ev.main(video_r1_argv(setup, video_r1_files, tmp_path / "whole"))
    text = capsys.readouterr().out
    assert len(whole) == 1 and [s["benchmark"] for s in whole[0]] == sorted(VIDEO_R1_BENCHMARKS)
    for s in whole[0]:
        saved = json.loads(Path(s["output"]).read_text())
        assert Path(s["output"]).name == f"eval_{s['benchmark']}_output.json" and set(saved) == {"results", "final_acc", "settings"}
        raw = json.loads((video_r1_files / f"eval_{s['benchmark']}.json").read_text())
        assert len(saved["results"]) == len(raw) == 2
        for row, r in zip(saved["results"], raw):
            assert {k: row[k] for k in r if k != "process"} == {k: v for k, v in r.items() if k != "process"}
            assert row["prediction"] == rewards.video_r1_prediction(row["output"])
            assert row["reward"] == rewards.video_r1_eval_reward(row["output"], r["solution"], r["problem_type"])
            assert row["correct"] == (row["reward"] == 1.0)
        acc = [r["reward"] for r in saved["results"] if r["problem_type"] != "regression"]
        mra = [r["reward"] for r in saved["results"] if r["problem_type"] == "regression"]
        assert saved["final_acc"] == [{"mean_acc": pytest.approx(sum(acc) / len(acc)),
                                       "mean_mra": pytest.approx(sum(mra) / len(mra)) if mra else 0.0}]
        assert f"{s['benchmark']} (" in text
    videomme = json.loads((tmp_path / "whole" / "eval_videomme_output.json").read_text())["results"]
    assert videomme[1]["output"] == ev.OUTPUT_ON_ERROR and videomme[1]["reward"] == 0.0 and "not found" in videomme[1]["error"]
    assert "summary (%)" in text and "not read" in text and "mean_mra (%)" in text

    # killed after the first row of the second benchmark, then run again: the same files, the first rows not redone
    argv = video_r1_argv(setup, video_r1_files, tmp_path / "resumed")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", KILL_AFTER="4")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 9, proc.stderr[-3000:]
    partial = json.loads((tmp_path / "resumed" / "eval_mvbench_output.json").read_text())
    assert len(partial["results"]) == 1 and "final_acc" not in partial  # eval_mvbench sorts second
    ev.main(argv)
    assert "mvbench: 2 rows, 1 already in" in capsys.readouterr().err
    for s in whole[0]:
        name = Path(s["output"]).name
        assert json.loads((tmp_path / "resumed" / name).read_text())["results"] == json.loads(Path(s["output"]).read_text())["results"]
    with pytest.raises(SystemExit) as exit_info:  # other settings never mix in
        ev.main(video_r1_argv(setup, video_r1_files, tmp_path / "resumed", "--max_frames", "2"))
    assert exit_info.value.code == 2 and "this run has max_frames=2; delete it or choose another --output" \
        in capsys.readouterr().err


def test_show_takes_the_problem_type_options_and_template(setup, capsys):
    import argparse
    video = str(Path(setup["data"]).parent / "videos" / "test_00000.mp4")
    args = argparse.Namespace(show=video, model_name_or_path=setup["model"], question="What shape?", save_pixels=None,
                              problem_type="multiple choice", options=["A. circle", "B. square"], prompt_template="video-r1",
                              fps=2.0, min_frames=4, max_frames=4, min_pixels=0, max_pixels=0)
    assert datatools.show_main(args) == 0
    shown = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert data.format_question("What shape?", "multiple choice", ["A. circle", "B. square"], prompt_template="video-r1") in shown["prompt"]
    assert datatools.show_main(argparse.Namespace(**{**vars(args), "options": None})) == 2  # multiple choice needs options


# ----------------------------------------------------------------------------------------------------------------
# never silently wrong (issue 31): a mistyped model path, results of other weights, --limit, bad input

@pytest.mark.parametrize("protocol", ["train", "video-r1"])
def test_tiny_never_builds_a_mistyped_model_folder(setup, tmp_path, monkeypatch, capsys, protocol):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "runs" / "tiny" / "fnal"
    data_path = setup["data"] if protocol == "train" else str(Path(setup["data"]).parent / "test_260k.json")
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--tiny", "--model", str(missing), "--protocol", protocol, "--data", data_path, "--limit", "1",
                 "--max_new_tokens", "4", "--num_workers", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: --model {missing}: no such folder") and len(err.splitlines()) == 1, err
    assert os.listdir(tmp_path) == []  # no model folder, no data, no results


def test_tiny_builds_only_at_its_own_folder(tmp_path, monkeypatch):
    import model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert model.check_model_path("data/tiny-qwen2-vl", tiny=True) == "qwen2_vl"
    assert model.check_model_path(str(tmp_path / "data" / "tiny-qwen3-vl") + "/", tiny=True) == "qwen3_vl"
    assert model.check_model_path("./data/tiny-qwen2.5-vl", tiny=True) == "qwen2_5_vl"
    assert model.check_model_path("data", tiny=True) is None  # a folder is used as it is
    assert model.check_model_path("Qwen/Qwen2-VL-7B-Instruct", tiny=True) is None  # a hub id is downloaded
    for name, tiny_run in (("data/tiny-qwen2-vl", False), ("data/tiny-qwen9-vl", True), ("data/fnal", True)):
        with pytest.raises(model.ModelError, match=re.escape(f"--model {name}: no such folder")):
            model.check_model_path(name, flag="--model", tiny=tiny_run)
    assert os.listdir(tmp_path / "data") == []


def swap_weights(model_dir, seed):
    """Replace a tiny model folder's weights by those of another tiny model of the same shape (another random seed)."""
    other = tiny.save_tiny_model(f"{model_dir}-seed{seed}", seed=seed, warm_start=False)
    os.replace(os.path.join(other, "model.safetensors"), os.path.join(model_dir, "model.safetensors"))


def test_weights_fingerprint(setup, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(setup["model"], copy)
    before = ev.weights_fingerprint(str(copy))
    assert before == ev.weights_fingerprint(setup["model"])  # the files' contents, not their folder or times
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert ev.weights_fingerprint(str(copy)) == before  # weights only
    swap_weights(str(copy), seed=1)
    assert os.path.getsize(copy / "model.safetensors") == os.path.getsize(Path(setup["model"]) / "model.safetensors")
    assert ev.weights_fingerprint(str(copy)) != before  # same names, sizes and header: the tensors' bytes tell
    (copy / "model.safetensors").rename(copy / "model-00001-of-00001.safetensors")
    assert ev.weights_fingerprint(str(copy)) not in (before, ev.weights_fingerprint(str(copy / "nothing")))


@pytest.mark.parametrize("protocol", ["train", "video-r1"])
def test_resume_never_reuses_results_of_other_weights(setup, video_r1_files, tmp_path, capsys, protocol):
    import shutil
    model_dir = tmp_path / "final"
    shutil.copytree(setup["model"], model_dir)

    def run(output):  # the completions of a run into `output`
        if protocol == "video-r1":
            argv = video_r1_argv(setup, video_r1_files / "eval_mvbench.json", output)
        else:
            argv = ["--model", setup["model"], "--data", setup["data"], "--output", str(output), "--max_new_tokens", "8",
                    "--batch_size", "2", "--num_workers", "0", "--limit", "2"]
        argv[argv.index("--model") + 1] = str(model_dir)
        summaries = ev.main(argv)
        results = json.loads(Path(summaries[0][0]["output"]).read_text())["results"] if protocol == "video-r1" \
            else summaries[0]["results"]
        return [r["output"] for r in results]

    first = run(tmp_path / "out")
    swap_weights(str(model_dir), seed=1)  # retrained into the same folder
    capsys.readouterr()
    again = run(tmp_path / "out")
    err = capsys.readouterr().err
    assert again == run(tmp_path / "fresh") != first  # evaluated anew, as a fresh --output is
    assert "other weights" in err and "starting over" in err, err


def test_video_r1_limit_never_drops_finished_rows(setup, video_r1_files, tmp_path, capsys):
    argv = video_r1_argv(setup, video_r1_files / "eval_mvbench.json", tmp_path / "out")
    out = tmp_path / "out" / "eval_mvbench_output.json"
    ev.main(argv + ["--limit", "1"])
    ev.main(argv)  # a larger --limit (here: none) continues the file
    assert "mvbench: 2 rows, 1 already in" in capsys.readouterr().err
    finished = out.read_bytes()
    assert len(json.loads(finished)["results"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv + ["--limit", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {out}: 2 finished rows") and "--limit 1" in err, err
    assert len(err.splitlines()) == 1 and out.read_bytes() == finished  # nothing dropped
    assert json.loads(finished)["settings"]["limit"] == 0  # the file says which rows it was asked to cover


@pytest.mark.parametrize("case", ["missing model", "missing file", "not JSON", "empty file", "a dict", "other settings",
                                  "output not JSON"])
def test_video_r1_bad_input_is_one_error_line(setup, video_r1_files, tmp_path, capsys, case):
    bench = tmp_path / "eval_bench.json"
    rows = json.loads((video_r1_files / "eval_mvbench.json").read_text())
    text = {"missing file": None, "not JSON": "path,problem,solution\n", "empty file": "", "a dict": json.dumps({"rows": rows})}
    if text.get(case, "") is not None:
        bench.write_text(text.get(case, json.dumps(rows)))
    argv, expected = video_r1_argv(setup, bench, tmp_path / "out"), f"error: --data {bench}: "
    if case == "missing model":
        argv[argv.index("--model") + 1] = str(tmp_path / "nope")
        expected = f"error: --model {tmp_path / 'nope'}: no such folder"
    elif case in ("other settings", "output not JSON"):
        (tmp_path / "out").mkdir()
        written = tmp_path / "out" / "eval_bench_output.json"
        settings = {"protocol": "video-r1", "max_frames": 2, "weights": ev.weights_fingerprint(setup["model"])}
        written.write_text(json.dumps({"results": [], "settings": settings}) if case == "other settings" else '{"results": [')
        expected = f"error: {written}: "
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(expected) and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "--model_name_or_path" not in err


@pytest.mark.parametrize("content", [b"video_filename,problem,solution\na.mp4,How many?,<answer>3</answer>\n",
                                     b'{\n  "rows": []\n}\n', b"\x00\xff\xfe binary"], ids=["csv", "pretty dict", "binary"])
def test_data_that_is_not_json_is_one_error_line(setup, tmp_path, capsys, content):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--model", setup["model"], "--data", str(path), "--output", str(tmp_path / "out.json"), "--num_workers", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: --data {path}: ") and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]


def test_plot_reads_the_runs_accuracy_reward(tmp_path):
    # --accuracy_reward names the reward the shapers read; plot's accuracy panel draws that one, not the first name
    # holding "accuracy" (a run without the key, or naming a reward it did not log, keeps the name rule)
    config = {"rewards": "accuracy,video_r1_accuracy,format", "accuracy_reward": "video_r1_accuracy"}
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    assert plot.reward_key(str(tmp_path), [], "rewards/accuracy") == "rewards/video_r1_accuracy"
    assert plot.reward_key(str(tmp_path), [], "rewards/format") == "rewards/format"
    (tmp_path / "run_config.json").write_text(json.dumps({**config, "accuracy_reward": "absent"}))
    assert plot.reward_key(str(tmp_path), [], "rewards/accuracy") == "rewards/accuracy"
