"""Tests for data.py: example loading, Qwen-exact video reading and patching, prompts, batching, synthetic data."""
import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from PIL import Image

import data
import datatools
import vision

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
PIX = 128 * 28 * 28


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    train, test = datatools.make_synthetic_dataset(out, n_train=6, n_test=3, seed=0)
    return out, train, test


@pytest.fixture(scope="module")
def tokenizer():
    tiny = pytest.importorskip("tiny", reason="tiny.py (the tiny tokenizer) is not there yet")
    return tiny.build_tiny_tokenizer()


# ----------------------------------------------------------------------------- load_examples

def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_load_examples_jsonl_skips_and_reports_bad_rows(tmp_path, capsys):
    _touch(tmp_path / "dvd" / "a.mp4")
    _touch(tmp_path / "dvd" / "b.mp4")
    lines = [
        json.dumps({"video_filename": "./dvd/a.mp4", "problem": "How many?", "solution": "<answer>3</answer>"}),
        "",                                                                                   # 2: blank, ignored
        "{not json",                                                                          # 3
        json.dumps({"video_filename": "./dvd/b.mp4", "solution": "<answer>1</answer>"}),      # 4: no problem
        json.dumps({"video_filename": "./dvd/zz.mp4", "problem": "Q", "solution": "<answer>1</answer>"}),  # 5
        json.dumps({"video_filename": "./dvd/b.mp4", "problem": "Q", "solution": 2}),          # 6: not a string
        json.dumps({"video_filename": "dvd/b.mp4", "problem": "Q2", "solution": "<answer>0</answer>"}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skipped = []
    ex = data.load_examples(path, skipped=skipped)
    assert ex == [  # the row's own columns (video_filename too: the rewards may name any) and the normalised ones
        {"video": str(tmp_path / "dvd" / "a.mp4"), "data_type": "video", "problem": "How many?", "video_filename": "./dvd/a.mp4",
         "solution": "<answer>3</answer>", "problem_type": "numerical", "options": [], "index": 1},
        {"video": str(tmp_path / "dvd" / "b.mp4"), "data_type": "video", "problem": "Q2", "solution": "<answer>0</answer>",
         "video_filename": "dvd/b.mp4", "problem_type": "numerical", "options": [], "index": 7},
    ]
    assert [(s["index"], s["video"]) for s in skipped] == [(3, None), (4, None), (5, str(tmp_path / "dvd" / "zz.mp4")), (6, None)]
    assert "invalid JSON" in skipped[0]["reason"] and "not found" in skipped[2]["reason"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5, err  # one line per bad row + the summary
    assert err[0].startswith(f"{path}:3:") and "invalid JSON" in err[0]
    assert err[1].startswith(f"{path}:4:") and "'problem'" in err[1]
    assert err[2].startswith(f"{path}:5:") and "zz.mp4" in err[2] and "not found" in err[2]
    assert err[3].startswith(f"{path}:6:") and "'solution'" in err[3]
    assert err[4] == f"loaded 2 of 6 rows from {path}, skipped 4"


def test_many_bad_rows_print_a_bounded_summary_with_right_counts(tmp_path, capsys):
    # Video-R1-260k holds ~146k rows training cannot use: a count per reason and the first 3 of each, not a line each
    _touch(tmp_path / "a.mp4")
    lines = [json.dumps({"video_filename": "a.mp4", "problem": "Q", "solution": "<answer>1</answer>"})] * 2
    lines += [json.dumps({"video_filename": f"missing{i}.mp4", "problem": "Q", "solution": "1"}) for i in range(300)]
    lines += ["{not json"] * 200 + [json.dumps({"video_filename": "a.mp4", "problem": "Q"})] * 100
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skipped = []
    assert len(data.load_examples(path, skipped=skipped)) == 2 and len(skipped) == 600
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 * 3 + 1 + 3, err  # 3 examples of each of the 3 reasons, the loaded line, 3 counts
    assert sum(f"{path}:{i}: skipped: video file not found" in e for e in err for i in (3, 4, 5)) == 3
    assert f"loaded 2 of 602 rows from {path}, skipped 600" in err
    assert "skipped 300 rows: video file not found: <video> (the first 3 above)" in err
    assert any(e.startswith("skipped 200 rows: invalid JSON") for e in err)
    assert "skipped 100 rows: field 'solution' missing or not a string (the first 3 above)" in err
    # data.py --check's report: the same summary of its bad rows
    report = {"rows": 602, "clips": [], "bad": [{"index": s["index"], "video": s["video"], "reason": s["reason"]} for s in skipped]}
    out = datatools.format_report(str(path), report).splitlines()
    assert len(out) == 3 * 3 + 3 + 1 and out[-1] == f"{path}: 602 rows, 0 good, 600 bad"
    assert "bad 300 rows: video file not found: <video> (the first 3 above)" in out
    # more reasons than `kinds`: the rest count together, still bounded
    skips = data.SkipSummary(kinds=2)
    for i in range(50):
        skips.add(f"row {i}", f"reason {chr(65 + i % 5)}")
    assert len(skips) == 50 and len(skips.lines()) == 3 + 3 + 3
    assert skips.summary() == ["skipped 30 rows: other reasons", "skipped 10 rows: reason B (the first 3 above)",
                               "skipped 10 rows: reason A (the first 3 above)"]


def test_load_examples_json_list_video_root_and_absolute(tmp_path, capsys):
    a = _touch(tmp_path / "videos" / "a.mp4")
    b = _touch(tmp_path / "elsewhere" / "b.mp4")
    path = tmp_path / "meta" / "test.json"
    path.parent.mkdir()
    path.write_text("  \n" + json.dumps([
        {"video_filename": "./a.mp4", "problem": "P1", "solution": "<answer>1</answer>"},
        {"video_filename": str(b), "problem": "P2", "solution": "<answer>2</answer>"},
        {"video_filename": "./missing.mp4", "problem": "P3", "solution": "<answer>3</answer>"},
    ]))
    ex = data.load_examples(path, video_root=tmp_path / "videos")
    assert [e["video"] for e in ex] == [str(a), str(b)]
    assert all(os.path.isabs(e["video"]) for e in ex)
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and "missing.mp4" in err and "skipped 1" in err


def test_load_examples_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_examples(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video_filename": "./x.mp4", "problem": "Q", "solution": "S"}\n\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        data.load_examples(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="broken.json"):
        data.load_examples(broken)


def test_load_examples_video_r1_layout_and_answer_types(tmp_path, capsys):
    _touch(tmp_path / "LLaVA-Video" / "a.mp4")
    rows = [
        {"problem_id": 1, "problem": "What colour?", "data_type": "video", "problem_type": "multiple choice",
         "options": ["A. red", "B. blue"], "solution": "<answer>B</answer>", "path": "./LLaVA-Video/a.mp4"},
        {"problem": "How many?", "data_type": "video", "problem_type": "numerical", "options": [],
         "solution": "<answer>2</answer>", "path": "./LLaVA-Video/a.mp4"},
        {"problem": "Describe", "data_type": "video", "problem_type": "free-form", "solution": "<answer>a cat</answer>",
         "path": "./LLaVA-Video/a.mp4"},
        {"problem": "What?", "data_type": "audio", "problem_type": "numerical", "solution": "<answer>1</answer>",
         "path": "./LLaVA-Video/a.mp4"},                                                       # 4: neither video nor image
        {"problem": "Read it", "data_type": "video", "problem_type": "essay", "solution": "<answer>x</answer>",
         "path": "./LLaVA-Video/a.mp4"},                                                       # 5: unknown type
        {"problem": "Pick", "data_type": "video", "problem_type": "multiple choice", "options": [],
         "solution": "<answer>A</answer>", "path": "./LLaVA-Video/a.mp4"},                     # 6: no options
        {"problem": "Pick", "data_type": "video", "problem_type": "multiple choice", "options": "A. x",
         "solution": "<answer>A</answer>", "path": "./LLaVA-Video/a.mp4"},                     # 7: options not a list
        {"problem": "Q", "data_type": "video", "solution": "<answer>1</answer>"},              # 8: no path
    ]
    path = tmp_path / "Video-R1-260k.json"
    path.write_text(json.dumps(rows))
    skipped = []
    ex = data.load_examples(path, skipped=skipped)
    video = str(tmp_path / "LLaVA-Video" / "a.mp4")
    assert [(e["index"], e["video"], e["problem_type"], e["options"]) for e in ex] == [
        (1, video, "multiple choice", ["A. red", "B. blue"]), (2, video, "numerical", []), (3, video, "free-form", [])]
    reasons = {s["index"]: s["reason"] for s in skipped}
    assert sorted(reasons) == [4, 5, 6, 7, 8]
    assert "data_type 'audio' is neither video nor image" in reasons[4] and "'essay'" in reasons[5] and "options" in reasons[6]
    assert "options" in reasons[7] and "'video_filename'" in reasons[8]
    err = capsys.readouterr().err
    assert f"{path}:5: skipped:" in err and "loaded 3 of 8 rows" in err


# ----------------------------------------------------------------------------- smart_resize

def test_smart_resize_known_values():
    assert vision.smart_resize(240, 320, 28, PIX, PIX) == (280, 392)  # scaled up: 252*308 < min
    assert vision.smart_resize(360, 640, 28, PIX, PIX) == (224, 420)  # scaled down: 364*644 > max
    assert vision.smart_resize(112, 112, 28, PIX, PIX) == (336, 336)
    assert vision.smart_resize(1080, 1920, 28, 56 * 56, 16384 * 28 * 28) == (1092, 1932)  # only rounded
    assert vision.smart_resize(1080, 1920, 28, 56 * 56, 1280 * 28 * 28) == (728, 1316)
    assert vision.smart_resize(10, 10, 28, 1, 10 ** 9) == (28, 28)  # never below one factor
    with pytest.raises(ValueError, match="aspect ratio"):
        vision.smart_resize(10, 2010)


def test_smart_resize_invariants():
    for h in range(30, 1200, 37):
        for w in range(30, 1200, 53):
            rh, rw = vision.smart_resize(h, w, 28, PIX, PIX)
            assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
            if round(h / 28) * round(w / 28) * 784 > PIX:  # the downscale branch lands within the bound
                assert rh * rw <= PIX


# ----------------------------------------------------------------------------- read_video

def test_read_video_synthetic(synthetic):
    out, _, _ = synthetic
    clip = out / "videos" / "train_00000.mp4"  # 16 frames at 8 fps, 112x112
    frames, sample_fps = vision.read_video(clip)
    assert frames.dtype == np.uint8 and frames.shape == (4, 336, 336, 3)  # 2 s * 2 fps; upscaled to >= min pixels
    assert sample_fps == pytest.approx(2.0)
    frames, sample_fps = vision.read_video(clip, fps=8, max_frames=16, min_pixels=112 * 112, max_pixels=112 * 112)
    assert frames.shape == (16, 112, 112, 3) and sample_fps == pytest.approx(8.0)
    frames, sample_fps = vision.read_video(clip, fps=8, max_frames=7)  # max floored to an even count
    assert frames.shape[0] == 6 and sample_fps == pytest.approx(6 / 16 * 8)
    frames, _ = vision.read_video(clip, fps=1, min_frames=5)  # min ceiled to an even count
    assert frames.shape[0] == 6
    for fps in (0.5, 1, 2, 3, 5, 8, 30):
        t = vision.read_video(clip, fps=fps, min_frames=4, max_frames=12, min_pixels=28 * 28, max_pixels=28 * 28)[0]
        assert t.shape[0] % 2 == 0 and 4 <= t.shape[0] <= 12
    # at its own size (a 112x112 target) PIL leaves the pixels alone: the output is decord's decoded frames
    frames, _ = vision.read_video(clip, fps=8, max_frames=16, min_pixels=112 * 112, max_pixels=112 * 112)
    assert np.array_equal(frames, decord.VideoReader(str(clip)).get_batch(list(range(16))).asnumpy())


@pytest.mark.parametrize("content", [b"", os.urandom(4096), None])
def test_read_video_bad_files_raise_video_error(tmp_path, content, capfd):
    path = tmp_path / "bad_clip.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(vision.VideoError, match="bad_clip.mp4") as error:
        vision.read_video(path)
    assert issubclass(vision.VideoError, ValueError)
    # the decoder's own lines (ffmpeg's "moov atom not found", decord's C++ source path) are in the one error line,
    # not on the process's stderr between the step lines
    assert capfd.readouterr().err == ""
    if content == b"":
        assert "(decoder: moov atom not found; " in str(error.value) and ".cc:" not in str(error.value), error.value


def test_check_a_file_without_rows_is_one_error_line(tmp_path, capsys):
    import argparse
    from dataclasses import fields
    for name, text in (("empty.jsonl", ""), ("broken.json", "[{not json")):
        (tmp_path / name).write_text(text)
        args = argparse.Namespace(check=str(tmp_path / name), video_root=None, model_name_or_path=None,
                                  **{f.name: f.default for f in fields(data.VideoSettings) if f.name in data.SETTING_FLAGS})
        assert datatools.check_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --check {tmp_path / name}: ") and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- real videos vs the Qwen reader

def _reference_read_video(path, fps=2.0, min_frames=4, max_frames=16, min_pixels=PIX, max_pixels=PIX):
    """qwen-vl-utils' fetch_video (decord backend), rewritten plainly: frame count, indices, size, and the
    arithmetic of torchvision's tensor resize(BICUBIC, antialias=True) (transforms/_functional_tensor.py)."""
    import decord

    vr = decord.VideoReader(str(path))
    total, vfps = len(vr), vr.get_avg_fps()
    n = total / vfps * fps
    n = min(max(n, 2 * math.ceil(min_frames / 2)), 2 * math.floor(max_frames / 2), total)
    n = 2 * math.floor(n / 2)
    idx = [int(i) for i in torch.linspace(0, total - 1, n).round().long()]
    raw = vr.get_batch(idx).asnumpy()
    h, w = raw.shape[1:3]
    max_pixels = min(max_pixels, max(min(128 * 28 * 28, 128000 * 28 * 28 * 0.9 / n * 2), int(min_pixels * 1.05)))
    rh, rw = round(h / 28) * 28, round(w / 28) * 28
    if rh * rw > max_pixels:
        s = math.sqrt(h * w / max_pixels)
        rh, rw = max(28, math.floor(h / s / 28) * 28), max(28, math.floor(w / s / 28) * 28)
    elif rh * rw < min_pixels:
        s = math.sqrt(min_pixels / (h * w))
        rh, rw = math.ceil(h * s / 28) * 28, math.ceil(w * s / 28) * 28
    video = torch.tensor(raw).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8, as qwen-vl-utils builds it
    out = torch.nn.functional.interpolate(video.to(torch.float32), size=[rh, rw], mode="bicubic",
                                          align_corners=False, antialias=True)
    out = torch.round(out.clamp(min=0, max=255)).to(torch.uint8)
    return out.permute(0, 2, 3, 1).numpy(), n / total * vfps, idx, raw


REAL = [("CATER_new_003595.mp4", (16, 280, 392, 3), 16 / 301 * 24.0),
        ("video1.mp4", (16, 224, 420, 3), None)]


@pytest.mark.parametrize("name,shape,sample_fps", REAL)
def test_read_video_real_matches_reference(name, shape, sample_fps):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    frames, fps = vision.read_video(SHARED / name)
    ref, ref_fps, idx, raw = _reference_read_video(SHARED / name)
    assert frames.shape == shape and frames.dtype == np.uint8
    assert len(idx) == 16 and idx[0] == 0
    assert np.array_equal(frames, ref)
    # PIL's bicubic is close but not equal (it rounds to uint8 between its horizontal and vertical passes)
    pil = np.stack([np.asarray(Image.fromarray(f).resize(shape[2:0:-1], Image.BICUBIC)) for f in raw])
    assert np.abs(pil.astype(int) - frames).max() <= 16 and np.abs(pil.astype(int) - frames).mean() < 1
    assert fps == pytest.approx(ref_fps, rel=1e-9)
    if sample_fps is not None:
        assert fps == pytest.approx(sample_fps)
    pv, thw = vision.video_to_patches(frames)
    assert thw.tolist() == [[8, shape[1] // 14, shape[2] // 14]] and pv.shape == (8 * shape[1] * shape[2] // 196, 1176)


@pytest.mark.parametrize("name", [r[0] for r in REAL])
def test_read_video_real_matches_qwen_vl_utils(name, monkeypatch):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    pytest.importorskip("torchvision")
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "decord")
    qvu = pytest.importorskip("qwen_vl_utils")
    ele = {"video": str(SHARED / name), "fps": 2.0, "min_frames": 4, "max_frames": 16,
           "min_pixels": PIX, "max_pixels": PIX}
    video, qfps = qvu.fetch_video(ele, return_video_sample_fps=True)  # (T, 3, H, W) float of uint8 values
    ours, fps = vision.read_video(SHARED / name)
    theirs = video.permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape and fps == pytest.approx(qfps)
    assert np.array_equal(ours, theirs.astype(np.uint8)) and np.array_equal(theirs, theirs.round())


def _video_r1_frame_size(h, w, nframes, min_pixels=PIX, total_pixels=int(128000 * 28 * 28 * 0.9)):
    """Video-R1's first trainer's vendored fetch_video with no pixel bounds in the video's dict, written out from its source:
    VIDEO_MAX_PIXELS = 128*28*28, max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2), int(min * 1.05))."""
    cap = max(min(128 * 28 * 28, total_pixels / nframes * 2), int(min_pixels * 1.05))
    rh, rw = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
    if rh * rw > cap:
        s = math.sqrt(h * w / cap)
        return math.floor(h / s / 28) * 28, math.floor(w / s / 28) * 28
    if rh * rw < min_pixels:
        s = math.sqrt(min_pixels / (h * w))
        return math.ceil(h * s / 28) * 28, math.ceil(w * s / 28) * 28
    return rh, rw


# (height, width): 4:3, 16:9, portrait, QCIF 176x144, 1080p, and the sizes the issue names
SIZES = [(480, 640), (600, 800), (768, 1024), (1080, 1440), (288, 352), (480, 720), (240, 320), (360, 640),
         (720, 1280), (1080, 1920), (640, 360), (1920, 1080), (144, 176)]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("nframes", [4, 10, 16])
def test_frame_size_follows_video_r1s_reader(hw, nframes):
    assert vision.frame_size(*hw, nframes) == _video_r1_frame_size(*hw, nframes)
    # an explicit cap can only lower the reader's
    h, w = vision.frame_size(*hw, nframes, max_pixels=56 * 56 * 4)
    assert h * w <= max(56 * 56 * 4, PIX) and (h, w) == vision.frame_size(*hw, nframes, max_pixels=56 * 56 * 4)
    assert vision.frame_size(*hw, nframes, max_pixels=10**9) == vision.frame_size(*hw, nframes)


def test_frame_size_total_pixels_budget(monkeypatch):
    # a small total budget (Video-R1's first trainer's VIDEO_MAX_PIXELS env var) lowers the per-frame cap, as fetch_video does
    monkeypatch.setattr(vision, "VIDEO_TOTAL_PIXELS", 400_000)
    for nframes in (4, 16):
        assert vision.frame_size(480, 640, nframes, min_pixels=3136) == _video_r1_frame_size(480, 640, nframes, 3136, 400_000)
    assert vision.frame_size(480, 640, 16, min_pixels=3136) == (168, 252)  # cap 50,000 pixels: 480/2.48 -> 168, 640/2.48 -> 252


def test_read_video_640x480_gives_video_r1s_frames(tmp_path):
    """The issue's case, decoded: 5 s of 640x480 at 5 fps -> 10 frames of 280x364, 650 video tokens (not 252x364)."""
    av = pytest.importorskip("av")
    path = tmp_path / "vga.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for i in range(25):
            img = np.full((480, 640, 3), (i * 10) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    frames, _ = vision.read_video(path)
    assert frames.shape == (10, 280, 364, 3)
    _, thw = vision.video_to_patches(frames)
    assert thw.tolist() == [[5, 20, 26]] and int(thw.prod()) // 4 == 650


# ----------------------------------------------------------------------------- video_to_patches

def _reference_patches(frames, ps=14, tps=2, m=2, mean=vision.CLIP_MEAN, std=vision.CLIP_STD):
    """Slow and explicit: for each (t, merged block, 2x2 cell) build the row as (channel, time, y, x)."""
    f = np.asarray(frames).astype(np.float32)  # (T, H, W, 3)
    mean255 = np.float32(np.array(mean, dtype=np.float32) * np.float32(255))
    std255 = np.float32(np.array(std, dtype=np.float32) * np.float32(255))
    f = (f - mean255) / std255
    while len(f) % tps:
        f = np.concatenate([f, f[-1:]])
    T, H, W, _ = f.shape
    rows = []
    for t in range(T // tps):
        for bh in range(H // ps // m):
            for bw in range(W // ps // m):
                for ih in range(m):
                    for iw in range(m):
                        y, x = (bh * m + ih) * ps, (bw * m + iw) * ps
                        row = []
                        for c in range(3):
                            for dt in range(tps):
                                row.extend(f[t * tps + dt, y:y + ps, x:x + ps, c].reshape(-1))
                        rows.append(row)
    return np.array(rows, dtype=np.float32), [T // tps, H // ps, W // ps]


@pytest.mark.parametrize("T,H,W", [(4, 56, 84), (3, 28, 56), (2, 84, 28)])
def test_video_to_patches_matches_slow_reference(T, H, W):
    frames = np.random.default_rng(T * H + W).integers(0, 256, size=(T, H, W, 3), dtype=np.uint8)
    pv, thw = vision.video_to_patches(frames)
    ref, grid = _reference_patches(frames)
    assert pv.dtype == torch.float32 and thw.dtype == torch.long
    assert thw.tolist() == [grid] and pv.shape == (grid[0] * grid[1] * grid[2], 1176)
    assert np.array_equal(pv.numpy(), ref)


def test_video_to_patches_other_layout_and_bad_size():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 32, 64, 3), dtype=np.uint8)
    pv, thw = vision.video_to_patches(frames, patch_size=8, temporal_patch_size=1, merge_size=4, mean=(0.5,) * 3,
                                    std=(0.5,) * 3)
    ref, grid = _reference_patches(frames, ps=8, tps=1, m=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert thw.tolist() == [grid] and np.array_equal(pv.numpy(), ref)
    with pytest.raises(AssertionError, match="video_to_patches"):
        vision.video_to_patches(np.zeros((2, 30, 56, 3), np.uint8))


def test_video_to_patches_matches_transformers():
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = np.random.default_rng(1).integers(0, 256, size=(4, 56, 84, 3), dtype=np.uint8)
    proc = Qwen2VLVideoProcessor()
    out = proc(videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], do_resize=False, do_sample_frames=False,
               return_tensors="pt")
    pv, thw = vision.video_to_patches(frames)
    assert torch.equal(out["video_grid_thw"], thw)
    assert torch.allclose(out["pixel_values_videos"], pv, atol=1e-6)


# ----------------------------------------------------------------------------- settings

def test_video_settings_from_pretrained(tmp_path):
    s = data.video_settings_from_pretrained(tmp_path / "missing", fps=1.0, max_pixels=1000)
    assert s == data.VideoSettings(fps=1.0, max_pixels=1000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25], "min_pixels": 3136, "max_pixels": 12845056}))
    s = data.video_settings_from_pretrained(tmp_path, max_frames=8)
    assert s.patch_size == 16 and s.image_mean == (0.5, 0.5, 0.5) and s.image_std == (0.25,) * 3
    # image bounds in the file are not used; the default lower bound is 128 merged patches of 16 * 2 px (Qwen3-VL's)
    assert s.max_frames == 8 and s.min_pixels == 128 * 32 * 32 and s.max_pixels == 0
    assert data.VideoSettings().min_pixels == PIX  # 128 merged patches of 14 * 2 px: Video-R1's first trainer's 128*28*28
    with pytest.raises(TypeError, match="nframes"):
        data.video_settings_from_pretrained(tmp_path, nframes=3)


# ----------------------------------------------------------------------------- prompts and batching

def test_build_prompt_text(tokenizer):
    text = data.build_prompt_text(tokenizer, "How many red objects are in the video?")
    assert text.count(data.VIDEO_PLACEHOLDER) == 1
    assert "How many red objects are in the video?  Output the thinking process in <think> </think>" in text
    assert text.endswith("<|im_start|>assistant\n")
    no_template = copy.copy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        data.build_prompt_text(no_template, "Q")
    tokenizer_text_only = copy.copy(tokenizer)
    tokenizer_text_only.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="video_pad"):
        data.build_prompt_text(tokenizer_text_only, "Q")


def test_prompt_per_problem_type(tokenizer):
    # numerical stays Video-R1's first trainer's exact text; every type asks for the tags; multiple choice lists lettered options
    assert data.PROMPT_TEMPLATE == ("{problem}  Output the thinking process in <think> </think> and final answer "
                                    "(number) in <answer> </answer> tags.")
    assert data.format_question("How many?") == data.PROMPT_TEMPLATE.format(problem="How many?")
    assert set(data.PROMPT_TEMPLATES) == {"numerical", "multiple choice", "free-form", "OCR", "regression"}
    mc = data.format_question("What shape?", "multiple choice", ["A. square", "B. circle", "triangle"])
    assert mc.startswith("What shape?\nOptions:\nA. square\nB. circle\nC. triangle\n") and "option letter" in mc
    free = data.format_question("Describe it.", "free-form")
    assert free.startswith("Describe it.") and "(number)" not in free
    for q in (mc, free):
        assert "<think> </think>" in q and "<answer> </answer>" in q
    text = data.build_prompt_text(tokenizer, "What shape?", "multiple choice", ["A. square", "B. circle"])
    assert "A. square\nB. circle" in text and text.count(data.VIDEO_PLACEHOLDER) == 1


def test_encode_prompt_expands_video_pad(tokenizer):
    text = data.build_prompt_text(tokenizer, "How many objects are moving?")
    pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    base = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, mm = data.encode_prompt(tokenizer, text, torch.tensor([[2, 24, 16]]))
    n = 2 * 24 * 16 // 4
    assert ids.dtype == torch.long and mm.dtype == torch.long and ids.shape == mm.shape == (len(base) - 1 + n,)
    assert int((ids == pad).sum()) == n
    assert torch.equal(mm == 2, ids == pad) and set(mm.tolist()) == {0, 2}
    where = (ids == pad).nonzero().flatten()
    assert int(where[-1] - where[0]) == n - 1  # one contiguous block
    assert ids[ids != pad].tolist() == [t for t in base if t != pad]  # text untouched
    with pytest.raises(ValueError, match="video_pad"):
        data.encode_prompt(tokenizer, "no video here", torch.tensor([[1, 2, 2]]))


def test_dataset_and_collate(synthetic, tokenizer, tmp_path):
    _, train, _ = synthetic
    examples = data.load_examples(train)
    bad = dict(examples[0], video=str(_touch(tmp_path / "corrupt.mp4")))
    examples = [examples[0], bad, dict(examples[1], problem="How many circles are there? " * 5)]
    settings = data.VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56)  # 4 frames of 56x56
    ds = data.VideoPromptDataset(examples, tokenizer, settings)
    items = [ds[i] for i in range(3)]
    assert "error" in items[1] and "corrupt.mp4" in items[1]["error"] and items[1]["index"] == 1
    good = [items[0], items[2]]
    for it in good:
        assert it["pixel_values_videos"].shape == (2 * 4 * 4, 1176) and it["video_grid_thw"].tolist() == [[2, 4, 4]]
        assert int((it["mm_token_type_ids"] == 2).sum()) == 8 and it["input_ids"].shape == it["mm_token_type_ids"].shape
    L0, L2 = len(items[0]["input_ids"]), len(items[2]["input_ids"])
    assert L2 > L0
    pad_id = tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=functools.partial(data.collate, pad_token_id=pad_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["mm_token_type_ids"].shape == (2, L2)
    assert batch["input_ids"][0, :L2 - L0].eq(pad_id).all() and batch["attention_mask"][0, :L2 - L0].eq(0).all()
    assert batch["mm_token_type_ids"][0, :L2 - L0].eq(0).all() and batch["attention_mask"][0, L2 - L0:].eq(1).all()
    assert torch.equal(batch["input_ids"][0, L2 - L0:], items[0]["input_ids"])
    assert torch.equal(batch["input_ids"][1], items[2]["input_ids"]) and batch["attention_mask"][1].eq(1).all()
    assert torch.equal(batch["pixel_values_videos"],
                       torch.cat([items[0]["pixel_values_videos"], items[2]["pixel_values_videos"]]))
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]] * 2
    # Qwen2.5-VL's temporal positions: seconds per temporal patch, temporal_patch_size / sample fps (its processor's)
    fps = [vision.read_video(examples[i]["video"], settings.fps, settings.min_frames, settings.max_frames,
                           settings.min_pixels, settings.max_pixels)[1] for i in (0, 2)]
    assert batch["second_per_grid_ts"].shape == (2,)
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([settings.temporal_patch_size / f for f in fps])
    assert batch["index"] == [0, 2] and batch["problem"] == [examples[0]["problem"], examples[2]["problem"]]
    assert batch["solution"] == [examples[0]["solution"], examples[2]["solution"]]
    assert [s["index"] for s in batch["skipped"]] == [1] and "corrupt.mp4" in batch["skipped"][0]["error"]
    empty = data.collate([items[1]], pad_token_id=pad_id)
    assert empty == {"problem": [], "solution": [], "video": [], "index": [], "columns": {},
                     "data_type": [], "skipped": [items[1]]}
    assert batch["columns"]["problem_type"] == ["numerical"] * 2 and batch["columns"]["options"] == [[], []]


def test_uncollate_inverts_collate_and_recombines_batches(synthetic, tokenizer):
    # --dynamic_sampling joins examples of several batches: collate(uncollate(b)) is b, and any selection of the
    # uncollated examples collates as those examples would have directly (prompts of other lengths re-padded)
    _, train, _ = synthetic
    examples = data.load_examples(train)
    examples = [examples[0], dict(examples[1], problem="How many circles are there? " * 5), examples[2]]
    ds = data.VideoPromptDataset(examples, tokenizer, data.VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56),
                                 shuffled_frames=True)
    items, pad_id = [ds[i] for i in range(3)], tokenizer.pad_token_id
    first, second = data.collate(items[:2], pad_id), data.collate(items[2:], pad_id)

    def same(a, b):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k

    same(data.collate(data.uncollate(first), pad_id), first)
    mixed = data.collate([data.uncollate(second)[0], data.uncollate(first)[0]], pad_id)
    same(mixed, data.collate([items[2], items[0]], pad_id))
    assert "pixel_values_videos_shuffled" in mixed and mixed["input_ids"].shape[1] < first["input_ids"].shape[1]


def test_a_reward_naming_a_new_column_gets_it_per_completion(synthetic, tokenizer, tmp_path):
    # a column no code knows (data_source) reaches a reward that names it: load_examples keeps it, collate carries it
    # (uncollate gives it back for --dynamic_sampling), compute_rewards hands it out per completion (issue 32)
    import types
    import rewards
    import train
    _, train_path, _ = synthetic
    examples = data.load_examples(train_path)[:3]
    path = tmp_path / "sources.jsonl"
    path.write_text("".join(json.dumps({"video_filename": e["video"], "problem": e["problem"], "solution": e["solution"],
                                        "data_source": f"source {i}"}) + "\n" for i, e in enumerate(examples)))
    loaded = data.load_examples(path)
    assert [e["data_source"] for e in loaded] == ["source 0", "source 1", "source 2"]
    ds = data.VideoPromptDataset(loaded, tokenizer, data.VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56))
    batch = data.collate([ds[0], ds[2]], tokenizer.pad_token_id)
    assert batch["columns"]["data_source"] == ["source 0", "source 2"]
    again = data.collate(data.uncollate(batch), tokenizer.pad_token_id)
    assert again["columns"] == batch["columns"]
    seen = []

    def from_source_0(completions, solutions, data_source):
        seen.extend(data_source)
        return [float(s == "source 0") for s in data_source]

    run = types.SimpleNamespace(cfg=train.Config(num_generations=2), reward_funcs=[from_source_0, rewards.format_reward],
                                reward_weights=[1.0, 0.0], accuracy_reward=from_source_0, G_shuffled=1)
    scores = rewards.score(run, again, ["a"] * 4, None, torch.tensor([3.0] * 4))
    assert seen == ["source 0", "source 0", "source 2", "source 2"]  # one value per completion, scored once
    assert scores.reward.tolist() == [1.0, 1.0, 0.0, 0.0] and scores.accuracy.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_overlong_prompt_is_skipped_not_truncated(synthetic, tokenizer):
    _, train, _ = synthetic
    examples = data.load_examples(train)[:1]
    settings = data.VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56)
    full = data.VideoPromptDataset(examples, tokenizer, settings)[0]
    L = len(full["input_ids"])
    assert "error" not in data.VideoPromptDataset(examples, tokenizer, settings, max_prompt_length=L)[0]
    item = data.VideoPromptDataset(examples, tokenizer, settings, max_prompt_length=L - 1)[0]
    assert "input_ids" not in item and "max_prompt_length" in item["error"] and examples[0]["video"] in item["error"]
    assert item["problem"] == examples[0]["problem"] and item["index"] == 0


# ----------------------------------------------------------------------------- synthetic dataset

def test_synthetic_dataset_is_deterministic_and_readable(synthetic, tmp_path, capsys):
    out, train, test = synthetic
    assert train == out / "train.jsonl" and test == out / "test.jsonl"
    again = datatools.make_synthetic_dataset(tmp_path / "again", n_train=6, n_test=3, seed=0)
    assert again[0].read_bytes() == train.read_bytes() and again[1].read_bytes() == test.read_bytes()
    assert (tmp_path / "again" / "videos" / "train_00003.mp4").read_bytes() == \
        (out / "videos" / "train_00003.mp4").read_bytes()
    other = datatools.make_synthetic_dataset(tmp_path / "other", n_train=6, n_test=3, seed=1)
    assert other[0].read_bytes() != train.read_bytes()
    capsys.readouterr()
    rows = data.load_examples(train) + data.load_examples(test)
    err = capsys.readouterr().err
    assert "skipped:" not in err and "loaded 6 of 6" in err and "loaded 3 of 3" in err
    raw = [json.loads(line) for line in train.read_text().splitlines()]
    assert raw[0]["video_filename"] == "./videos/train_00000.mp4"
    for row in rows:
        frames, _ = vision.read_video(row["video"], fps=8, max_frames=16, min_pixels=112 * 112, max_pixels=112 * 112)
        assert frames.shape == (16, 112, 112, 3)
        assert row["problem"].startswith("How many ") and row["problem"].endswith("?")
        n = int(row["solution"].removeprefix("<answer>").removesuffix("</answer>"))
        assert 0 <= n <= 5


def test_synthetic_clips_decode_the_same_whichever_process_made_them(tmp_path):
    # the clips are H.264 lossless: two fresh copies made by two processes decode to the same pixels, so the tiny demo
    # trains the same from every clone (at crf 18, 10 of 40 clips decoded differently from one process to the next)
    make = "import sys, datatools; datatools.make_synthetic_dataset(sys.argv[1], n_train=20, n_test=4)"
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", make, str(tmp_path / name)], cwd=here, check=True, capture_output=True)
    for path in sorted((tmp_path / "a" / "videos").glob("*.mp4")):
        frames = [vision.read_video(str(root / "videos" / path.name), fps=8, max_frames=16, min_pixels=112 * 112,
                                  max_pixels=112 * 112)[0] for root in (tmp_path / "a", tmp_path / "b")]
        assert np.array_equal(*frames), path.name


# ----------------------------------------------------------------------------- T-GRPO's shuffled copy

def test_frame_permutation_is_seeded_and_never_the_identity():
    for seed in range(30):
        perm = data.frame_permutation(4, seed)
        assert sorted(perm.tolist()) == [0, 1, 2, 3] and perm.tolist() != [0, 1, 2, 3]
        assert torch.equal(perm, data.frame_permutation(4, seed))
        assert data.frame_permutation(2, seed).tolist() == [1, 0]


def test_shuffled_frames_are_patched_after_shuffling(synthetic, tokenizer):
    _, train, _ = synthetic
    settings = data.VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56)  # 4 frames of 56x56: 2 temporal patches
    read = lambda ex: vision.read_video(ex["video"], settings.fps, settings.min_frames, settings.max_frames,
                                      settings.min_pixels, settings.max_pixels)[0]
    # clips with motion: a lossless clip of static shapes has identical frames, which no order can change
    examples = [ex for ex in data.load_examples(train) if not (read(ex) == read(ex)[:1]).all()][:2]
    assert len(examples) == 2
    plain = data.VideoPromptDataset(examples, tokenizer, settings)
    ds = data.VideoPromptDataset(examples, tokenizer, settings, shuffled_frames=True, shuffle_seed=3)
    assert "pixel_values_videos_shuffled" not in plain[0]
    for i in range(2):
        item = ds[i]
        frames = read(examples[i])
        perm = data.frame_permutation(len(frames), 3 * 1_000_003 + i)
        normal, shuffled = item["pixel_values_videos"], item["pixel_values_videos_shuffled"]
        assert torch.equal(normal, plain[i]["pixel_values_videos"])
        assert torch.equal(shuffled, vision.video_to_patches(frames[perm.numpy()])[0])
        assert shuffled.shape == normal.shape and not torch.equal(shuffled, normal)
        # a patch spans 2 frames: unless the permutation moves whole pairs, the shuffled video's patches are new
        # rows, not a reordering of the normal ones (so permuting patch rows could not produce them)
        pairs_kept = all(perm[2 * k].item() % 2 == 0 and perm[2 * k + 1].item() == perm[2 * k].item() + 1
                         for k in range(len(perm) // 2))
        is_row_permutation = all((row == normal).all(1).any() for row in shuffled)
        assert is_row_permutation == pairs_kept and not pairs_kept  # these seeds' orders: [0, 2, 1, 3], [3, 0, 1, 2]
    batch = data.collate([ds[0], ds[1]], pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(batch["pixel_values_videos_shuffled"], torch.cat([ds[0]["pixel_values_videos_shuffled"],
                                                                         ds[1]["pixel_values_videos_shuffled"]]))
    doubled = data.shuffled_copy(batch)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw"):
        assert torch.equal(doubled[key], torch.cat([batch[key], batch[key]])), key
    assert torch.equal(doubled["pixel_values_videos"], torch.cat([batch["pixel_values_videos"],
                                                                  batch["pixel_values_videos_shuffled"]]))
def test_synthetic_multiple_choice_split(synthetic, tokenizer):
    out, train, test = synthetic
    for split, counting in (("train", train), ("test", test)):
        mc = [json.loads(line) for line in (out / f"{split}_mc.jsonl").read_text().splitlines()]
        count_rows = [json.loads(line) for line in counting.read_text().splitlines()]
        assert [r["video_filename"] for r in mc] == [r["video_filename"] for r in count_rows]  # the same clips
        for row in mc:
            assert row["problem_type"] == "multiple choice" and [o[:3] for o in row["options"]] == ["A. ", "B. ", "C. ", "D. "]
            texts = [o[3:] for o in row["options"]]
            assert len(set(texts)) == 4, row
            letter = row["solution"].removeprefix("<answer>").removesuffix("</answer>")
            assert letter in "ABCD"
            right = texts["ABCD".index(letter)]
            if row["problem"] == "How many objects are there in total?":
                assert 1 <= int(right) <= 5
            else:
                assert row["problem"].startswith("What shape is the ") and right in ("square", "circle")
    examples = data.load_examples(out / "train_mc.jsonl")
    assert all(e["problem_type"] == "multiple choice" for e in examples)
    item = data.VideoPromptDataset(examples[:1], tokenizer, data.VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56))[0]
    assert item["problem_type"] == "multiple choice" and item["options"] == examples[0]["options"]
def test_check_reports_bad_rows_and_statistics_without_training(synthetic, tmp_path):
    """python data.py --check: the synthetic set checks clean (exit 0), then a copy with three kinds of
    bad row (exit 1, each named by file and line), then a missing file (exit 2)."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    _, train, _ = synthetic
    cmd = [sys.executable, "data.py", "--max_frames", "4", "--min_pixels", str(112 * 112), "--max_pixels", str(112 * 112)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([*cmd, "--check", str(train)], cwd=here, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    frames = [vision.read_video(ex["video"], max_frames=4, min_pixels=112 * 112, max_pixels=112 * 112)[0]
              for ex in data.load_examples(train, verbose=False)]
    tokens = [int(vision.video_to_patches(f)[1].prod()) // 4 for f in frames]
    assert f"{train}: 6 rows, 6 good, 0 bad" in proc.stdout
    assert f"video tokens per clip: min {min(tokens)} mean {sum(tokens) / 6:.1f} max {max(tokens)}" in proc.stdout
    assert f"frame size (HxW): {frames[0].shape[1]}x{frames[0].shape[2]}: 6" in proc.stdout
    assert "decoding train.jsonl" in proc.stderr and "100%" in proc.stderr  # the progress bar

    rows = Path(train).read_text().splitlines()
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"not a video")
    bad_rows = [json.dumps({**json.loads(rows[1]), "video_filename": str(tmp_path / "videos" / "broken.mp4")}),  # line 2
                "{not json",                                                                # line 3
                json.dumps({"video_filename": "./videos/none.mp4", "problem": "?", "solution": "1"})]  # line 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([rows[0], *bad_rows, rows[2]]) + "\n")
    proc = subprocess.run([*cmd, "--check", str(bad), "--video_root", str(Path(train).parent)], cwd=here, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"{bad}: 5 rows, 2 good, 3 bad" in proc.stdout
    assert f"{bad}:2: bad: read_video: cannot open" in proc.stdout and "(decoder: " in proc.stdout
    assert ".cc:" not in proc.stderr and "Invalid data" not in proc.stderr, proc.stderr  # folded into the bad row's line
    assert f"{bad}:3: bad: invalid JSON" in proc.stdout
    assert f"{bad}:4: bad: video file not found" in proc.stdout
    proc = subprocess.run([*cmd, "--check", str(tmp_path / "missing.jsonl")], cwd=here, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "error: --check" in proc.stderr and "missing.jsonl" in proc.stderr


# ----------------------------------------------------------------------------- Video-R1-260k: all five types, its prompts

# Video-R1's src/r1-v/src/open_r1/grpo.py (QUESTION_TEMPLATE, TYPE_TEMPLATE) and src/eval_bench.py, character for character
VIDEO_R1_HEAD = ("Please think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
                 "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or "
                 "other natural language thought expressions It's encouraged to include self-reflection or verification "
                 "in the reasoning process. ")
VIDEO_R1_TRAIN_TAIL = ("Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
                       "between the <answer> </answer> tags.")
VIDEO_R1_EVAL_TAIL = ("Provide your detailed reasoning between the <think> and </think> tags, and then give your final "
                      "answer between the <answer> and </answer> tags.")
VIDEO_R1_SUFFIX = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}


@pytest.mark.parametrize("problem_type", list(VIDEO_R1_SUFFIX))
def test_video_r1_prompt_templates_byte_for_byte(problem_type, tokenizer):
    options = ["A. red", "B. blue"] if problem_type == "multiple choice" else []
    question = "What is it?" + ("Options:\nA. red\nB. blue\n" if options else "")  # its options: verbatim, no lettering
    for name, tail in (("video-r1", VIDEO_R1_TRAIN_TAIL), ("video-r1-eval", VIDEO_R1_EVAL_TAIL)):
        expected = f"{question}\n{VIDEO_R1_HEAD}{tail}{VIDEO_R1_SUFFIX[problem_type]}"
        got = data.format_question("What is it?", problem_type, options, prompt_template=name)
        assert got.encode() == expected.encode(), name
        text = data.build_prompt_text(tokenizer, "What is it?", problem_type, options, prompt_template=name)
        assert text.count(expected) == 1 and text.index(data.VIDEO_PLACEHOLDER) < text.index(expected)
    assert data.format_question("What is it?", problem_type, options) != expected  # the default stays ours
    assert "default" in data.PROMPT_TEMPLATE_NAMES


def test_synthetic_260k_split_has_all_five_types(synthetic, tokenizer):
    """train_260k.json / test_260k.json: a JSON list in Video-R1-260k's layout about the synthetic clips, a video row
    per clip and an image row per clip (its first frame), every problem type in turn in each, each solution worth 1.0
    to our accuracy and (up to its regression quirk) Video-R1's."""
    import rewards
    out, _, _ = synthetic
    raw = json.loads((out / "train_260k.json").read_text())
    videos, images = raw[:6], raw[6:]
    assert [r["problem_type"] for r in videos] == [*rewards.PROBLEM_TYPES, rewards.PROBLEM_TYPES[0]]
    assert len(images) == 6 and {r["problem_type"] for r in images} == set(rewards.PROBLEM_TYPES)
    assert all(set(r) == {"problem_id", "problem", "data_type", "problem_type", "options", "process", "solution", "path",
                          "data_source"} for r in raw)
    assert all(r["path"].startswith("./videos/") and r["data_type"] == "video" for r in videos)
    assert all(r["path"].startswith("./images/") and r["data_type"] == "image" and "video" not in r["problem"] for r in images)
    examples = data.load_examples(out / "train_260k.json", verbose=False)
    assert len(examples) == 12 and all(os.path.isfile(e["video"]) for e in examples)
    assert [e["data_type"] for e in examples] == ["video"] * 6 + ["image"] * 6
    sols, types = [e["solution"] for e in examples], [e["problem_type"] for e in examples]
    completions = [f"<think>x</think>{s}" for s in sols]
    assert rewards.accuracy_reward(completions, sols, problem_type=types, options=[e["options"] for e in examples]) == [1.0] * 12
    assert rewards.video_r1_accuracy(completions, sols, problem_type=types) == pytest.approx([1.0] * 12)
    item = data.VideoPromptDataset(examples[1:2], tokenizer, data.VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56),
                                   prompt_template="video-r1")[0]
    prompt = tokenizer.decode(item["input_ids"])
    assert examples[1]["problem"] + "Options:\n" + "".join(o + "\n" for o in examples[1]["options"]) in prompt
    assert prompt.rstrip().endswith(VIDEO_R1_SUFFIX["multiple choice"] + "<|im_end|>\n<|im_start|>assistant")
    report = datatools.check_dataset(out / "test_260k.json", settings=data.VideoSettings(max_frames=4, min_pixels=56 * 56,
                                                                                     max_pixels=56 * 56), progress=False)
    assert report["rows"] == 6 and report["bad"] == [] and len(report["clips"]) == 3
    assert [i["grid"] for i in report["images"]] == [(1, 8, 8)] * 3  # 112x112 first frames, inside [4, 256] merged patches
    assert "6 rows, 6 good (3 videos, 3 images), 0 bad" in datatools.format_report("t", report)


# ----------------------------------------------------------------------------- image rows (Video-R1's fetch_image)

def _reference_fetch_image(path, min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28):
    """Video-R1's vendored fetch_image on a local file, written out apart from vision.py: to_rgb (RGBA pasted on white
    through its alpha, else convert("RGB")), its smart_resize (no max(factor, ...) in the downscale branch), PIL's
    default resize."""
    from PIL import Image
    image = Image.open(path)
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        image = white
    else:
        image = image.convert("RGB")
    width, height = image.size
    h, w = max(28, round(height / 28) * 28), max(28, round(width / 28) * 28)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return np.asarray(image.resize((w, h)))


@pytest.mark.parametrize("shape, mode, expected", [((300, 170, 4), "RGBA", (308, 168)),  # inside the bounds
                                                   ((1000, 700, 3), "RGB", (532, 364)),  # down to <= 256 * 28 * 28
                                                   ((20, 30, 3), "RGB", (56, 84)),       # up to >= 4 * 28 * 28
                                                   ((40, 60), "L", (56, 84)),             # grey: convert("RGB")
                                                   ((90, 120, 2), "LA", (84, 112))])      # LA: convert, no white
def test_read_image_is_video_r1s_fetch_image(shape, mode, expected, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    ours = vision.read_image(path, 4 * 28 * 28, 256 * 28 * 28)
    assert ours.shape == (*expected, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, _reference_fetch_image(path))


def test_read_image_rgba_goes_over_white_and_bad_images_are_errors(tmp_path):
    from PIL import Image
    clear = np.zeros((56, 56, 4), dtype=np.uint8)  # fully transparent black: white after fetch_image's paste
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert (vision.read_image(tmp_path / "clear.png", 4 * 28 * 28, 256 * 28 * 28) == 255).all()
    Image.fromarray(np.zeros((2, 500, 3), dtype=np.uint8)).save(tmp_path / "thin.png")  # aspect 250 > 200
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for name, reason in (("thin.png", "aspect ratio"), ("junk.png", "cannot identify"), ("missing.png", "No such file")):
        with pytest.raises(vision.ImageError, match=reason):
            vision.read_image(tmp_path / name, 4 * 28 * 28, 256 * 28 * 28)


def test_image_rows_load_patch_and_prompt(tmp_path, tokenizer):
    # a 260k-layout file of one image row, one video row, one bad image and one of an unknown data_type
    out = datatools.make_synthetic_dataset(tmp_path / "s", n_train=1, n_test=1)[0].parent
    Image.fromarray(np.full((60, 90, 3), 7, dtype=np.uint8)).save(out / "a.jpg")
    (out / "bad.png").write_bytes(b"junk")
    rows = [{"path": "./a.jpg", "data_type": "image", "problem": "What is it?", "solution": "<answer>1</answer>"},
            {"path": "./videos/train_00000.mp4", "data_type": "video", "problem": "How many?", "solution": "<answer>1</answer>"},
            {"path": "./bad.png", "data_type": "image", "problem": "?", "solution": "<answer>1</answer>"},
            {"path": "./a.jpg", "data_type": "audio", "problem": "?", "solution": "<answer>1</answer>"}]
    (out / "mixed.json").write_text(json.dumps(rows))
    skipped = []
    examples = data.load_examples(out / "mixed.json", skipped=skipped, verbose=False)
    assert [e["data_type"] for e in examples] == ["image", "video", "image"]
    assert [s["reason"] for s in skipped] == ["data_type 'audio' is neither video nor image"]
    settings = data.VideoSettings(max_frames=4, min_pixels=56 * 56, max_pixels=56 * 56)
    ds = data.VideoPromptDataset(examples, tokenizer, settings, shuffled_frames=True)
    image, video, bad = ds[0], ds[1], ds[2]
    assert "cannot identify" in bad["error"] and bad["data_type"] == "image"
    assert image["image_grid_thw"].tolist() == [[1, 4, 6]] and image["image_size"] == [56, 84]  # 60x90 -> 56x84
    assert "pixel_values_videos_shuffled" not in image  # T-GRPO shuffles no image
    frames = np.asarray(Image.open(out / "a.jpg").convert("RGB").resize((84, 56)))
    torch.testing.assert_close(image["pixel_values"], vision.video_to_patches(np.stack([frames, frames]))[0])  # t repeated
    prompt = tokenizer.decode(image["input_ids"])
    assert prompt.count("<|image_pad|>") == 6 and "<|video_pad|>" not in prompt
    assert prompt.index("<|vision_start|>") < prompt.index("What is it?")  # the image before the question
    assert image["mm_token_type_ids"].tolist() == [1 if t == "<|image_pad|>" else 0 for t in
                                                   tokenizer.convert_ids_to_tokens(image["input_ids"])]
    # a mixed batch: each kind's rows and grids in row order; T-GRPO doubles only the video rows
    batch = data.collate([video, image, bad], tokenizer.pad_token_id)
    assert batch["data_type"] == ["video", "image"] and len(batch["skipped"]) == 1
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]] and batch["video_grid_thw"].shape == (1, 3)
    assert batch["second_per_grid_ts"].shape == (1,) and batch["pixel_values"].shape == (24, 1176)
    doubled = data.shuffled_copy(batch)
    assert doubled["input_ids"].tolist() == batch["input_ids"][[0, 1, 0]].tolist()  # B + V rows: the video row again
    assert doubled["video_grid_thw"].shape == (2, 3) and torch.equal(doubled["pixel_values"], batch["pixel_values"])
    again = data.collate(data.uncollate(batch), tokenizer.pad_token_id)
    for k, v in batch.items():
        assert (torch.equal(again[k], v) if torch.is_tensor(v) else k == "skipped" or again[k] == v), k
    swapped = data.collate(data.uncollate(batch)[::-1], tokenizer.pad_token_id)  # items keep their own pixels
    assert torch.equal(swapped["pixel_values"], batch["pixel_values"]) and swapped["data_type"] == ["image", "video"]


def test_video_time_video_r1_is_one_second_per_temporal_patch(synthetic, tokenizer, tmp_path):
    # 8 frames of a 16-frame 8-fps clip: sampled at 4 fps, 0.5 s per temporal patch in true time; Video-R1's trainer: 1.0
    out, train, _ = synthetic
    examples = data.load_examples(train, verbose=False)[:1]
    for video_time, seconds in (("true", 0.5), ("video-r1", 1.0)):
        settings = data.VideoSettings(min_frames=8, max_frames=8, min_pixels=56 * 56, max_pixels=56 * 56, video_time=video_time)
        assert data.VideoPromptDataset(examples, tokenizer, settings)[0]["second_per_grid_ts"].tolist() == [seconds]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="qwen2_vl reads no second_per_grid_ts"):
        data.video_settings_from_pretrained(tmp_path, video_time="video-r1")
    with pytest.raises(ValueError, match="--video_time 'fake'"):
        data.video_settings_from_pretrained(None, video_time="fake")


def test_video_max_pixels_raises_the_readers_constant():
    # Video-R1's 32-frame evaluation: VIDEO_MAX_PIXELS edited to 256*28*28 in its reader; --max_pixels can only lower
    assert vision.frame_size(480, 640, 32) == (280, 364)  # the training cap: 128*28*28 * 1.05
    assert vision.frame_size(480, 640, 32, max_pixels=256 * 28 * 28) == (280, 364)
    h, w = vision.frame_size(480, 640, 32, video_max_pixels=256 * 28 * 28)
    assert (h, w) == (364, 504) and h * w <= 256 * 28 * 28  # 640x480 / sqrt(307200 / 200704), floored to 28
    assert data.VideoSettings(image_min_pixels=0).image_max_pixels == 256 * 28 * 28
    assert data.VideoSettings(patch_size=16).image_min_pixels == 4 * 32 * 32  # Qwen3-VL: its own merged patches


def test_qwen3_vl_image_is_its_image_processors(tmp_path):
    # the genuine Qwen3-VL preprocessor_config.json: 16-px patches, mean/std 0.5, its bounds [65536, 16777216] after
    # the reader's [4, 256] merged patches of 32 px: a 112x112 image ends at 256x256, as its image processor makes it
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    folder = SHARED.parent / "qwen" / "Qwen3-VL-2B-Instruct"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    import tiny
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    settings = data.video_settings_from_pretrained(folder)
    assert settings.image_bounds == (65536, 16777216) and settings.factor == 32
    item = data.VideoPromptDataset([{"video": str(tmp_path / "x.png"), "data_type": "image", "problem": "?", "solution": ""}],
                                   tiny.build_tiny_tokenizer(), settings)[0]
    reader = vision.read_image(tmp_path / "x.png", 4 * 32 * 32, 256 * 32 * 32, 32)
    theirs = Qwen2VLImageProcessorPil.from_pretrained(folder)(images=[Image.fromarray(reader)], return_tensors="pt")
    assert item["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist() == [[1, 16, 16]]
    torch.testing.assert_close(item["pixel_values"], theirs["pixel_values"].float(), rtol=0, atol=1e-5)
