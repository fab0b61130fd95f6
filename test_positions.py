"""
Positions every pass feeds the model, and Qwen3-VL's timestamps, against the rules the models were released with.

The release rule (Qwen2-VL: transformers 4.45, Qwen2.5-VL: 4.49, `get_rope_index`, written by the models' authors; its
docstring: "we calculate the text start position_ids as the max vision position_ids plus 1"): text one step per token
in all three axes; a video block of grid (t, h, w) starting at s gets temporal s + (arange(t) * second_per_grid_t *
tokens_per_second).long() (Qwen2-VL: s + arange(t)), height s + arange(h/2), width s + arange(w/2); the text after it
starts at the block's largest position + 1. An image block is the same with t = 1 and no time (4.49: second_per_grid_t
0 for an image; Qwen2-VL: arange(1)). `reference_positions` writes it out token by token, apart from model.py.
"""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import datatools
import model as model_lib
import tiny
import vision

SHARED = Path(__file__).resolve().parent.parent / "shared"


def reference_positions(types, mask, grids, merge=2, seconds=None, tokens_per_second=1, image_grids=()):
    """The release rule, one token at a time on Python lists: types, mask (B, P) lists; grids one (t, h, w) per video
    block in batch order; seconds one second_per_grid_t per video (None: Qwen2-VL); image_grids one (1, h, w) per image
    block (type 1) in batch order. Padding 1 (the release code fills torch.ones). Returns (3, B, P) nested lists."""
    B, P = len(types), len(types[0])
    out = [[[1] * P for _ in range(B)] for _ in range(3)]
    video = image = 0
    for b in range(B):
        real = [p for p in range(P) if mask[b][p]]
        nxt, i = 0, 0
        while i < len(real):
            if types[b][real[i]] == 0:
                for axis in range(3):
                    out[axis][b][real[i]] = nxt
                nxt, i = nxt + 1, i + 1
                continue
            is_image = types[b][real[i]] == 1
            t, h, w = image_grids[image] if is_image else grids[video]
            h, w = h // merge, w // merge
            # the release code's product, in its float32 tensor arithmetic, then truncated
            times = [0] * t if is_image else [int(k) for k in (
                torch.arange(t) * torch.tensor(seconds[video], dtype=torch.float32) * tokens_per_second).long()] \
                if seconds is not None else list(range(t))
            for k in range(t):
                for y in range(h):
                    for x in range(w):
                        p = real[i]
                        out[0][b][p], out[1][b][p], out[2][b][p] = nxt + times[k], nxt + y, nxt + x
                        i += 1
            nxt = nxt + max(max(times), h - 1, w - 1) + 1
            image, video = image + is_image, video + (not is_image)
    return out


def prompts(grids, text_before=(15, 10), text_after=(20, 5)):
    """Two rows: text, one video block, text; the second row shorter, left-padded. Returns (types, mask) (2, P)."""
    rows = [[0] * a + [2] * (t * h * w // 4) + [0] * c for a, (t, h, w), c in zip(text_before, grids, text_after)]
    P = max(map(len, rows))
    types = torch.tensor([[0] * (P - len(r)) + r for r in rows])                       # (2, P)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])             # (2, P)
    return types, mask


def first_text_after_video(positions, types, mask, b=0):
    """The position of the first text token after row b's video block."""
    last = int((types[b] == 2).nonzero().max())
    return int(torch.as_tensor(positions)[0, b, last + 1])


@pytest.fixture(scope="module")
def hf_models():
    """Tiny Qwen2-VL and Qwen2.5-VL (merge 2; Qwen2.5-VL 2 tokens per second, as the 3B/7B): transformers' own
    get_rope_index of the installed version."""
    tokenizer = tiny.build_tiny_tokenizer()
    return {f: tiny.build_tiny_model(tokenizer, family=f) for f in ("qwen2_vl", "qwen2_5_vl")}


def hf_positions(hf_model, types, mask, grids, seconds=None):
    kw = {"second_per_grid_ts": torch.tensor(seconds)} if seconds is not None else {}
    return hf_model.model.get_rope_index(torch.zeros_like(types), types, video_grid_thw=torch.tensor(grids),
                                         attention_mask=mask, **kw)[0]


# (family, grids of the two rows, second_per_grid_t per video, does transformers 5.23 differ)
CASES = {
    # Video-R1's first trainer's settings on CATER_new_003595.mp4: 16 frames of 280x392, sampled at 1.28 fps (Qwen2.5-VL-7B: 2 tokens/s)
    "qwen2.5-vl defaults": ("qwen2_5_vl", [(8, 20, 28), (8, 16, 30)], [1.5677083, 2.7534769], True),
    # --fps 4 --max_frames 32 on a 241-frame 30-fps clip: 32 frames at 3.98 fps, second_per_grid_t 0.502 (fractional)
    "qwen2.5-vl fps 4": ("qwen2_5_vl", [(16, 16, 22), (16, 8, 8)], [2 / (32 / 241 * 30)] * 2, True),
    # an interval of 1.5 positions: truncating the interval (to 1) instead of each product would give other times
    "qwen2.5-vl interval 1.5": ("qwen2_5_vl", [(6, 8, 8), (4, 8, 12)], [0.75, 0.75], True),
    # --max_frames 32 at 12,544 pixels a frame: grid_t 16 > max(h, w) / 2 = 4
    "qwen2-vl many small frames": ("qwen2_vl", [(16, 8, 8), (12, 8, 12)], None, True),
    # Video-R1's first trainer's settings: grid_t 8 <= max(h, w) / 2, both rules agree
    "qwen2-vl defaults": ("qwen2_vl", [(8, 20, 28), (8, 16, 30)], None, False),
}


@pytest.mark.parametrize("case", CASES)
def test_release_positions_follow_the_release_rule(case, hf_models):
    family, grids, seconds, differs = CASES[case]
    types, mask = prompts(grids)
    tps = 2 if family == "qwen2_5_vl" else 1
    expected = reference_positions(types.tolist(), mask.tolist(), grids, seconds=seconds, tokens_per_second=tps)
    ours = model_lib.release_positions(types, mask, torch.tensor(grids), 2,
                                       torch.tensor(seconds) if seconds else None, tokens_per_second=tps)
    assert ours.tolist() == expected
    # and through the family table, as every pass takes them
    batch = {"input_ids": torch.zeros_like(types), "mm_token_type_ids": types, "attention_mask": mask,
             "video_grid_thw": torch.tensor(grids), "second_per_grid_ts": torch.tensor(seconds or [1.0, 1.0])}
    positions, next_pos = model_lib.prompt_positions(hf_models[family], batch)
    assert positions.tolist() == expected
    assert next_pos.tolist() == [max(max(axis[b]) for axis in expected) + 1 for b in range(2)]
    # transformers 5.23 moves the text on by max(h, w) / 2 only: where grid_t's positions outrun that, it differs
    theirs = hf_positions(hf_models[family], types, mask, grids, seconds)
    assert theirs[:, mask.bool()].tolist() != ours[:, mask.bool()].tolist() if differs else theirs[:, mask.bool()].tolist() == ours[:, mask.bool()].tolist()


def test_transformers_get_rope_index_still_differs(hf_models):
    # recorded: the installed transformers' text start after a video is the block's start + max(h, w) / 2. The day this
    # fails, transformers changed its rule: re-read docs/models.md "Positions" before trusting its positions anywhere
    grids, seconds = [(8, 20, 28), (8, 16, 30)], [1.5677083, 2.7534769]
    types, mask = prompts(grids)
    theirs = hf_positions(hf_models["qwen2_5_vl"], types, mask, grids, seconds)
    ours = model_lib.release_positions(types, mask, torch.tensor(grids), 2, torch.tensor(seconds), tokens_per_second=2)
    assert [first_text_after_video(theirs, types, mask, b) for b in range(2)] == [15 + 14, 10 + 15]
    assert [first_text_after_video(ours, types, mask, b) for b in range(2)] == [15 + 22, 10 + 39]  # 7 x 1.57 x 2, 7 x 2.75 x 2


def test_qwen3_vl_own_positions_equal_the_release_rule_on_its_t1_groups():
    # Qwen3-VL gives each 2-frame group its own t = 1 block between timestamps: there the release rule's "max + 1" and
    # transformers' "+ max(h, w) / 2" are the same number, and the family keeps the model's own get_rope_index
    tokenizer = tiny.build_tiny_tokenizer()
    qwen3 = tiny.build_tiny_model(tokenizer, family="qwen3_vl")
    items = []
    for problem, grid in (("How many red objects are in the video?", (4, 4, 6)), ("How many?", (3, 6, 4))):
        grid = torch.tensor([grid])
        timestamps = data.video_timestamps(list(range(0, 10 * 2 * int(grid[0, 0]), 10)), 24.0)
        ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, problem), grid, timestamps=timestamps)
        items.append({"input_ids": ids, "mm_token_type_ids": types, "video_grid_thw": grid,
                      "pixel_values_videos": torch.zeros(1, 1), "problem": "", "solution": "", "video": "", "index": 0})
    batch = data.collate(items, tokenizer.pad_token_id)
    assert batch["attention_mask"][1, 0] == 0, "the second prompt should be left-padded"
    own, _ = model_lib.prompt_positions(qwen3, batch)                                  # (3, 2, P)
    t1_blocks = [[1, h, w] for t, h, w in batch["video_grid_thw"].tolist() for _ in range(t)]
    release = reference_positions(batch["mm_token_type_ids"].tolist(), batch["attention_mask"].tolist(), t1_blocks)
    real = batch["attention_mask"].bool()
    assert own[:, real].tolist() == torch.tensor(release)[:, real].tolist()


def test_image_blocks_follow_the_release_rule(hf_models):
    # rows: an image, a video, an image (left-padded), in one batch: each kind takes its own grids in row order; an image
    # is a t = 1 block at the start position, the text after it starts at its largest position + 1
    image_grids, video_grids, seconds = [(1, 8, 12), (1, 10, 6)], [(4, 8, 8)], [1.5]
    rows = [[0] * 7 + [1] * 24 + [0] * 9, [0] * 5 + [2] * 64 + [0] * 4, [0] * 3 + [1] * 15 + [0] * 2]
    P = max(map(len, rows))
    types = torch.tensor([[0] * (P - len(r)) + r for r in rows])                       # (3, P)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])             # (3, P)
    for family, tps, secs in (("qwen2_vl", 1, None), ("qwen2_5_vl", 2, seconds)):
        expected = reference_positions(types.tolist(), mask.tolist(), video_grids, seconds=secs, tokens_per_second=tps,
                                       image_grids=image_grids)
        ours = model_lib.release_positions(types, mask, torch.tensor(video_grids), 2, torch.tensor(secs) if secs else None,
                                           tokens_per_second=tps, image_grid_thw=torch.tensor(image_grids))
        assert ours.tolist() == expected
        batch = {"input_ids": torch.zeros_like(types), "mm_token_type_ids": types, "attention_mask": mask,
                 "image_grid_thw": torch.tensor(image_grids), "video_grid_thw": torch.tensor(video_grids),
                 "second_per_grid_ts": torch.tensor(seconds)}
        assert model_lib.prompt_positions(hf_models[family], batch)[0].tolist() == expected  # as every pass takes them
        # on a t = 1 block "largest + 1" is transformers 5.23's "start + max(h, w) / 2": the image rows agree with it
        images = torch.tensor([0, 2])
        theirs = hf_models[family].model.get_rope_index(torch.zeros_like(types[images]), types[images],
                                                        image_grid_thw=torch.tensor(image_grids), attention_mask=mask[images])[0]
        real = mask[images].bool()
        assert theirs[:, real].tolist() == ours[:, images][:, real].tolist()
    assert [ours[a, 0, P - len(rows[0]) + 7 + 24] for a in range(3)] == [7 + 6] * 3  # 7 text, then 6 merged columns
    assert ours[0, 0, P - len(rows[0]) + 7:P - len(rows[0]) + 31].unique().tolist() == [7]  # no time in an image


def test_an_image_only_batch_needs_no_video_entries(hf_models):
    # a batch of image rows only (no video_grid_thw, an empty second_per_grid_ts): every family's position function
    tokenizer = tiny.build_tiny_tokenizer()
    grid = torch.tensor([[1, 4, 6]])
    ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, "What is it?", data_type="image"), grid,
                                    data_type="image")
    assert int((types == 1).sum()) == 6 and not (types == 2).any()
    item = {"input_ids": ids, "mm_token_type_ids": types, "image_grid_thw": grid, "pixel_values": torch.zeros(24, 1176),
            "problem": "", "solution": "", "video": "x.png", "index": 0, "data_type": "image"}
    batch = data.collate([item], tokenizer.pad_token_id)
    assert "video_grid_thw" not in batch and batch["second_per_grid_ts"].shape == (0,)
    for family in ("qwen2_vl", "qwen2_5_vl"):
        positions, _ = model_lib.prompt_positions(hf_models[family], batch)
        expected = reference_positions(batch["mm_token_type_ids"].tolist(), batch["attention_mask"].tolist(), [],
                                       image_grids=grid.tolist())
        assert positions.tolist() == expected


def qwen_folder(name, tmp_path):
    """A model folder without weights: the genuine small files plus the shared BPE files (../shared/qwen/README.md)."""
    if not (SHARED / "qwen" / name).is_dir():
        pytest.skip(f"{SHARED / 'qwen' / name} absent")
    tmp_path.mkdir(parents=True, exist_ok=True)
    for f in [*(SHARED / "qwen" / name).iterdir(), SHARED / "qwen" / "vocab.json", SHARED / "qwen" / "merges.txt"]:
        shutil.copy(f, tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("video, text_start", [("CATER_new_003595.mp4", 37), ("video1.mp4", 54)])
def test_show_puts_text_after_the_video_by_the_release_rule(video, text_start, tmp_path):
    # data.py --show with the genuine Qwen2.5-VL-7B files at Video-R1's first trainer's settings (transformers 5.23: 29 and 30)
    path = SHARED / "data" / video
    if not path.is_file():
        pytest.skip(f"{path} absent")
    folder = qwen_folder("Qwen2.5-VL-7B-Instruct", tmp_path / "qwen2.5-vl-7b")
    shown, _ = datatools.show_video(path, folder, "How many objects are in the video?", data.video_settings_from_pretrained(folder))
    ids, positions = shown["input_ids"], shown["position_ids"]
    last_video = max(i for i, t in enumerate(ids) if t == 151656)                     # <|video_pad|>
    assert [axis[last_video + 1] for axis in positions] == [text_start] * 3
    (seconds,) = shown["second_per_grid_ts"]  # what every pass gets: 2 frames / the sample fps
    t = shown["grid_thw"][0]
    assert text_start == positions[0][last_video - shown["video_tokens"] + 1] + int((t - 1) * np.float32(seconds) * 2) + 1


def test_show_image_is_the_official_image_processor_and_chat_template(tmp_path):
    # data.py --show IMAGE with the genuine Qwen2.5-VL-7B files: grid, pixels, ids of transformers' own processor (its
    # chat template, Qwen2VLImageProcessor on the reader's RGB image), positions by the release rule
    import json
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    folder = qwen_folder("Qwen2.5-VL-7B-Instruct", tmp_path / "qwen2.5-vl-7b")
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"  # RGBA, 300x170 (HxW): over white, resized to 308x168 (4 * 28 * 28 <= area <= 256 * 28 * 28)
    Image.fromarray(rng.integers(0, 256, (300, 170, 4), dtype=np.uint8), "RGBA").save(path)
    shown, pixels = datatools.show_video(path, folder, "What is it?", data.video_settings_from_pretrained(folder),
                                    data_type="image")
    reader = vision.read_image(path, 4 * 28 * 28, 256 * 28 * 28)
    # the processor (AutoProcessor needs torchvision for its video half): its image processor, its chat template
    # (chat_template.json), its text rule (each <|image_pad|> becomes grid product / merge^2 of them), then the tokenizer
    theirs = Qwen2VLImageProcessorPil.from_pretrained(folder)(images=[Image.fromarray(reader)], return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = json.loads((Path(folder) / "chat_template.json").read_text())["chat_template"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                                          data.format_question("What is it?")}]}], chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(theirs["image_grid_thw"].prod()) // 4))
    assert shown["grid_thw"] == theirs["image_grid_thw"][0].tolist() == [1, 22, 12]  # 308x168
    assert shown["input_ids"] == tokenizer(text)["input_ids"] and shown["image_tokens"] == 66
    torch.testing.assert_close(pixels, theirs["pixel_values"].float(), rtol=0, atol=1e-5)
    image = [i for i, t in enumerate(shown["input_ids"]) if t == 151655]               # <|image_pad|>
    positions = torch.tensor(shown["position_ids"])
    assert positions[0, image].unique().tolist() == [image[0]]  # t = 1, no time
    assert positions[:, image[-1] + 1].tolist() == [image[0] + 10 + 1] * 3  # text after: start + largest (22 / 2 - 1) + 1


def test_qwen2_vl_many_small_frames_on_the_genuine_prompt(hf_models, tmp_path):
    # Qwen2-VL's chat template, --max_frames 32 at 12,544 pixels a frame (112x112): grid (16, 8, 8); the release rule
    # starts the text at 31, transformers 5.23 at 19
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(qwen_folder("Qwen2-VL-2B-Instruct", tmp_path / "qwen2-vl"))
    grid = torch.tensor([[16, 8, 8]])
    ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, "How many?"), grid)
    types, mask = types[None], torch.ones(1, len(ids), dtype=torch.long)
    ours = model_lib.release_positions(types, mask, grid, 2)
    theirs = hf_positions(hf_models["qwen2_vl"], types, mask, grid.tolist())
    assert (first_text_after_video(ours, types, mask), first_text_after_video(theirs, types, mask)) == (31, 19)


# ----------------------------------------------------------------------------- Qwen3-VL timestamps

def write_clip(path, num_frames, fps):
    """A lossless H.264 clip of num_frames 64x64 frames at fps (as data.py writes the synthetic ones)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"qp": "0", "threads": "1"}
        for i in range(num_frames):
            img = np.full((64, 64, 3), (i * 7) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("num_frames, fps", [(71, 30), (191, 60), (29, 10)])
def test_qwen3_vl_timestamps_are_the_processors(num_frames, fps, tmp_path):
    # clip lengths where (a + b) / 2 / fps and the processor's (a / fps + b / fps) / 2 round apart at one decimal
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    path = tmp_path / f"{num_frames}x{fps}.mp4"
    write_clip(path, num_frames, fps)
    _, _, info = vision.read_video(path, with_meta=True, factor=32, min_pixels=128 * 32 * 32)
    assert info["video_fps"] == fps and info["frame_indices"][-1] == num_frames - 1
    ours = [f"{s:.1f}" for s in data.video_timestamps(info["frame_indices"], info["video_fps"])]
    # the processor's own method (it reads nothing of self) and its "<{t:.1f} seconds>"
    theirs = [f"{s:.1f}" for s in Qwen3VLProcessor._calculate_timestamps(None, list(info["frame_indices"]), info["video_fps"], 2)]
    assert ours == theirs
    idx = info["frame_indices"]
    midpoint_first = [f"{(idx[i] + idx[i + 1]) / 2 / fps:.1f}" for i in range(0, len(idx), 2)]
    assert midpoint_first != theirs, "this clip length should be one where the two roundings differ"
    assert math.isclose(data.video_timestamps([0, num_frames - 1], fps)[0], (num_frames - 1) / fps / 2)
