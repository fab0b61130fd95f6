"""Tests for data.py: example loading, Qwen-exact video reading and patching, prompts, batching, synthetic data."""
import copy
import functools
import json
import math
import os
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from PIL import Image

import data

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
PIX = 128 * 28 * 28


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    train, test = data.make_synthetic_dataset(out, n_train=6, n_test=3, seed=0)
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
    assert ex == [
        {"video": str(tmp_path / "dvd" / "a.mp4"), "problem": "How many?", "solution": "<answer>3</answer>", "index": 1},
        {"video": str(tmp_path / "dvd" / "b.mp4"), "problem": "Q2", "solution": "<answer>0</answer>", "index": 7},
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


# ----------------------------------------------------------------------------- smart_resize

def test_smart_resize_known_values():
    assert data.smart_resize(240, 320, 28, PIX, PIX) == (280, 392)  # scaled up: 252*308 < min
    assert data.smart_resize(360, 640, 28, PIX, PIX) == (224, 420)  # scaled down: 364*644 > max
    assert data.smart_resize(112, 112, 28, PIX, PIX) == (336, 336)
    assert data.smart_resize(1080, 1920, 28, 56 * 56, 16384 * 28 * 28) == (1092, 1932)  # only rounded
    assert data.smart_resize(1080, 1920, 28, 56 * 56, 1280 * 28 * 28) == (728, 1316)
    assert data.smart_resize(10, 10, 28, 1, 10 ** 9) == (28, 28)  # never below one factor
    with pytest.raises(ValueError, match="aspect ratio"):
        data.smart_resize(10, 2010)


def test_smart_resize_invariants():
    for h in range(30, 1200, 37):
        for w in range(30, 1200, 53):
            rh, rw = data.smart_resize(h, w, 28, PIX, PIX)
            assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
            if round(h / 28) * round(w / 28) * 784 > PIX:  # the downscale branch lands within the bound
                assert rh * rw <= PIX


# ----------------------------------------------------------------------------- read_video

def test_read_video_synthetic(synthetic):
    out, _, _ = synthetic
    clip = out / "videos" / "train_00000.mp4"  # 16 frames at 8 fps, 112x112
    frames, sample_fps = data.read_video(clip)
    assert frames.dtype == np.uint8 and frames.shape == (4, 336, 336, 3)  # 2 s * 2 fps; upscaled to >= min pixels
    assert sample_fps == pytest.approx(2.0)
    frames, sample_fps = data.read_video(clip, fps=8, max_frames=16, min_pixels=112 * 112, max_pixels=112 * 112)
    assert frames.shape == (16, 112, 112, 3) and sample_fps == pytest.approx(8.0)
    frames, sample_fps = data.read_video(clip, fps=8, max_frames=7)  # max floored to an even count
    assert frames.shape[0] == 6 and sample_fps == pytest.approx(6 / 16 * 8)
    frames, _ = data.read_video(clip, fps=1, min_frames=5)  # min ceiled to an even count
    assert frames.shape[0] == 6
    for fps in (0.5, 1, 2, 3, 5, 8, 30):
        t = data.read_video(clip, fps=fps, min_frames=4, max_frames=12, min_pixels=28 * 28, max_pixels=28 * 28)[0]
        assert t.shape[0] % 2 == 0 and 4 <= t.shape[0] <= 12
    # at its own size (a 112x112 target) PIL leaves the pixels alone: the output is decord's decoded frames
    frames, _ = data.read_video(clip, fps=8, max_frames=16, min_pixels=112 * 112, max_pixels=112 * 112)
    assert np.array_equal(frames, decord.VideoReader(str(clip)).get_batch(list(range(16))).asnumpy())


@pytest.mark.parametrize("content", [b"", os.urandom(4096), None])
def test_read_video_bad_files_raise_video_error(tmp_path, content):
    path = tmp_path / "bad_clip.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(data.VideoError, match="bad_clip.mp4"):
        data.read_video(path)
    assert issubclass(data.VideoError, ValueError)


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
    max_pixels = min(max_pixels, max(min(768 * 28 * 28, 128000 * 28 * 28 * 0.9 / n * 2), int(min_pixels * 1.05)))
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
    frames, fps = data.read_video(SHARED / name)
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
    pv, thw = data.video_to_patches(frames)
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
    ours, fps = data.read_video(SHARED / name)
    theirs = video.permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape and fps == pytest.approx(qfps)
    assert np.array_equal(ours, theirs.astype(np.uint8)) and np.array_equal(theirs, theirs.round())


# ----------------------------------------------------------------------------- video_to_patches

def _reference_patches(frames, ps=14, tps=2, m=2, mean=data.CLIP_MEAN, std=data.CLIP_STD):
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
    pv, thw = data.video_to_patches(frames)
    ref, grid = _reference_patches(frames)
    assert pv.dtype == torch.float32 and thw.dtype == torch.long
    assert thw.tolist() == [grid] and pv.shape == (grid[0] * grid[1] * grid[2], 1176)
    assert np.array_equal(pv.numpy(), ref)


def test_video_to_patches_other_layout_and_bad_size():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 32, 64, 3), dtype=np.uint8)
    pv, thw = data.video_to_patches(frames, patch_size=8, temporal_patch_size=1, merge_size=4, mean=(0.5,) * 3,
                                    std=(0.5,) * 3)
    ref, grid = _reference_patches(frames, ps=8, tps=1, m=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert thw.tolist() == [grid] and np.array_equal(pv.numpy(), ref)
    with pytest.raises(AssertionError, match="video_to_patches"):
        data.video_to_patches(np.zeros((2, 30, 56, 3), np.uint8))


def test_video_to_patches_matches_transformers():
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = np.random.default_rng(1).integers(0, 256, size=(4, 56, 84, 3), dtype=np.uint8)
    proc = Qwen2VLVideoProcessor()
    out = proc(videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], do_resize=False, do_sample_frames=False,
               return_tensors="pt")
    pv, thw = data.video_to_patches(frames)
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
    assert s.max_frames == 8 and s.min_pixels == s.max_pixels == PIX  # image bounds in the file are not used
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
    fps = [data.read_video(examples[i]["video"], settings.fps, settings.min_frames, settings.max_frames,
                           settings.min_pixels, settings.max_pixels)[1] for i in (0, 2)]
    assert batch["second_per_grid_ts"].shape == (2,)
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([settings.temporal_patch_size / f for f in fps])
    assert batch["index"] == [0, 2] and batch["problem"] == [examples[0]["problem"], examples[2]["problem"]]
    assert batch["solution"] == [examples[0]["solution"], examples[2]["solution"]]
    assert [s["index"] for s in batch["skipped"]] == [1] and "corrupt.mp4" in batch["skipped"][0]["error"]
    empty = data.collate([items[1]], pad_token_id=pad_id)
    assert empty == {"problem": [], "solution": [], "video": [], "index": [], "skipped": [items[1]]}


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
    again = data.make_synthetic_dataset(tmp_path / "again", n_train=6, n_test=3, seed=0)
    assert again[0].read_bytes() == train.read_bytes() and again[1].read_bytes() == test.read_bytes()
    assert (tmp_path / "again" / "videos" / "train_00003.mp4").read_bytes() == \
        (out / "videos" / "train_00003.mp4").read_bytes()
    other = data.make_synthetic_dataset(tmp_path / "other", n_train=6, n_test=3, seed=1)
    assert other[0].read_bytes() != train.read_bytes()
    capsys.readouterr()
    rows = data.load_examples(train) + data.load_examples(test)
    err = capsys.readouterr().err
    assert "skipped:" not in err and "loaded 6 of 6" in err and "loaded 3 of 3" in err
    raw = [json.loads(line) for line in train.read_text().splitlines()]
    assert raw[0]["video_filename"] == "./videos/train_00000.mp4"
    for row in rows:
        frames, _ = data.read_video(row["video"], fps=8, max_frames=16, min_pixels=112 * 112, max_pixels=112 * 112)
        assert frames.shape == (16, 112, 112, 3)
        assert row["problem"].startswith("How many ") and row["problem"].endswith("?")
        n = int(row["solution"].removeprefix("<answer>").removesuffix("</answer>"))
        assert 0 <= n <= 5
