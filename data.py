"""
Data for GRPO on video: DVD-counting examples, Qwen2-VL video preprocessing (Qwen3-VL's: 16-px patches, mean/std 0.5,
a timestamp per frame pair; VideoSettings from the model folder), prompts, batching.

The pipeline, per example:
    load_examples(jsonl)   -> {"video", "data_type", "problem", "solution", "problem_type", "options"} dicts
                              (DVD-counting or Video-R1-260k rows, video or image)
    read_video(path)       -> uint8 frames (T, H, W, 3), sampled and resized exactly like qwen-vl-utils' fetch_video
                              (an image row: vision.read_image, Video-R1's fetch_image; its patches are the image
                              repeated to the temporal patch, pixel_values / image_grid_thw, and <|image_pad|>s)
    video_to_patches()     -> pixel_values_videos (N, 1176), video_grid_thw (1, 3), as transformers' Qwen2-VL processor
    build_prompt_text() / encode_prompt() -> input_ids with the video placeholder expanded, mm_token_type_ids
    VideoPromptDataset + collate -> left-padded batches (bad files are skipped, never crash a worker)
    batches_from()         -> each rank's batches, epoch after epoch, from any (epoch, batch) position (exact resume)

No torchvision: frames are decoded with decord and resized with the very torch call that qwen-vl-utils' torchvision
resize(BICUBIC, antialias=True) makes on uint8 tensors (float32 bicubic interpolate, clamp, round). PIL's bicubic is
not used: it rounds to uint8 between its two passes, which moves up to ~20% of pixels by up to ~10 levels.

    python data.py --synthetic data/synthetic   # a small dataset of moving shapes: counting (train/test.jsonl)
                                                # and multiple choice (train_mc/test_mc.jsonl) about the same clips
    python data.py --check data/synthetic/train.jsonl   # decodes every video: bad rows, frame/token statistics
    python data.py --show VIDEO --model_name_or_path DIR  # what the model sees: frames, grid, prompt ids, positions
    python data.py --show IMAGE.png --model_name_or_path DIR  # the same for an image row
    python data.py --show VIDEO --model_name_or_path DIR --prompt_template video-r1 --problem_type "multiple choice" \
        --question "What colour is the cube?" --options "A. red" "B. blue"   # Video-R1's later prompt for that row
"""
import argparse
import atexit
import contextlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

import rewards
import runtime
import vision
from vision import smart_resize  # noqa: F401 (data.smart_resize: callers and tests)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Video-R1's first trainer's own copy of qwen-vl-utils (src/qwen-vl-utils/src/qwen_vl_utils/vision_process.py): frames come in pairs;
# "VIDEO_MIN_PIXELS = 128 * 28 * 28 / VIDEO_MAX_PIXELS = 128 * 28 * 28" (upstream qwen-vl-utils has 768 * 28 * 28)
FRAME_FACTOR = 2
VIDEO_MAX_PIXELS = 128 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # its default VIDEO_MAX_PIXELS env var: a 128K-token budget
PROMPT_TEMPLATE = ("{problem}  Output the thinking process in <think> </think> and final answer (number) "
                   "in <answer> </answer> tags.")
# one template per rewards.PROBLEM_TYPES entry, shared by train and eval; numerical is Video-R1's first trainer's exact text
PROMPT_TEMPLATES = {
    "numerical": PROMPT_TEMPLATE,
    "multiple choice": ("{problem}\nOptions:\n{options}\nOutput the thinking process in <think> </think> and final "
                        "answer (the option letter only, e.g. A) in <answer> </answer> tags."),
    "free-form": ("{problem}  Output the thinking process in <think> </think> and final answer (a short text) "
                  "in <answer> </answer> tags."),
    "OCR": ("{problem}  Output the thinking process in <think> </think> and final answer (the text, transcribed) "
            "in <answer> </answer> tags."),
    "regression": ("{problem}  Output the thinking process in <think> </think> and final answer (a number) "
                   "in <answer> </answer> tags."),
}
assert set(PROMPT_TEMPLATES) == set(rewards.PROBLEM_TYPES)
# Video-R1's later trainer (src/r1-v/src/open_r1/grpo.py: QUESTION_TEMPLATE, TYPE_TEMPLATE), byte for byte. Its question
# is the problem, then for multiple choice "Options:\n" and each option verbatim followed by "\n" (format_question).
VIDEO_R1_QUESTION = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break "
    "it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer between the "
    "<answer> </answer> tags.")
VIDEO_R1_TYPE_SUFFIX = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}
# its eval script (src/eval_bench.py) words the last sentence differently: "between the <think> and </think> tags"
VIDEO_R1_EVAL_QUESTION = VIDEO_R1_QUESTION.replace("the <think> </think> tags", "the <think> and </think> tags").replace(
    "the <answer> </answer> tags.", "the <answer> and </answer> tags.")
# --prompt_template NAME (train.py, eval.py, data.py --show): NAME -> (question template, per-type suffixes); "default"
# is PROMPT_TEMPLATES above
VIDEO_R1_TEMPLATES = {"video-r1": (VIDEO_R1_QUESTION, VIDEO_R1_TYPE_SUFFIX),
                      "video-r1-eval": (VIDEO_R1_EVAL_QUESTION, VIDEO_R1_TYPE_SUFFIX)}
PROMPT_TEMPLATE_NAMES = ("default", *VIDEO_R1_TEMPLATES)
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# data_type -> (chat template part, placeholder, pad token, mm_token_type_ids value: transformers' 1 image, 2 video)
MEDIA = {"video": ("video", VIDEO_PLACEHOLDER, "<|video_pad|>", 2), "image": ("image", IMAGE_PLACEHOLDER, "<|image_pad|>", 1)}


class VideoError(ValueError):
    """A video that cannot be decoded (missing, empty, corrupt, too short)."""


# ----------------------------------------------------------------------------- examples

class SkipSummary:
    """Skipped rows, summarised (train.py, eval.py and --check share it): a file of 146k bad rows prints a few lines,
    not 146k. add() keeps (and, given a stream, prints) the first `examples` rows of each reason; lines() are those
    rows, then a count for every reason some of whose rows were not shown. A reason is the message's first line with its
    paths and numbers blanked (reason()); past `kinds` reasons the rest count as "other reasons"."""

    def __init__(self, examples=3, kinds=10, stream=None, prefix=""):
        self.examples, self.kinds, self.stream, self.prefix = examples, kinds, stream, prefix
        self.counts, self.shown = {}, []  # reason -> rows; the example lines in the order added

    @staticmethod
    def reason(message, video=None):
        """"video file not found: /d/a.mp4" -> "video file not found: <video>"; other absolute paths -> <path>, numbers
        (and hex addresses) -> N."""
        message = (message.replace(video, "<video>") if video else message).split("\n")[0]
        message = re.sub(r"(?<![\w<])/[^\s,;:()]+", "<path>", message)  # another file (a decoder's message may name one)
        return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", message)

    def add(self, where, message, video=None):
        kind = self.reason(message, video)
        if kind not in self.counts and len(self.counts) >= self.kinds:
            kind = "other reasons"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= self.examples and kind != "other reasons":
            line = f"{self.prefix}{where}: {message}"
            self.shown.append(line)
            if self.stream is not None:
                print(line, file=self.stream, flush=True)

    def __len__(self):
        return sum(self.counts.values())

    def summary(self, what="skipped"):
        """A count line for each reason with rows not shown, most rows first."""
        hidden = sorted(((n, k) for k, n in self.counts.items() if n > self.examples or k == "other reasons"), reverse=True)
        return [f"{self.prefix}{what + ' ' if what else ''}{n} rows: {k}"
                + ("" if k == "other reasons" else f" (the first {self.examples} above)") for n, k in hidden]

    def print_summary(self, what="skipped"):
        for line in self.summary(what):
            print(line, file=self.stream or sys.stderr, flush=True)

    def lines(self, what="skipped"):
        return self.shown + self.summary(what)


def load_examples(path, video_root=None, skipped=None, verbose=True):
    """
    Read rows (JSONL, or a JSON list) into [{"video": abs path, "data_type", "problem", "solution", "problem_type",
    "options", "index", and every other column of the row}] (the rewards get them by name), index being the row's line (JSONL) or record (JSON list) number, "video" the row's file (a
    video, or an image when data_type is "image"). Two layouts: DVD-counting (video_filename, problem, solution) and
    Video-R1-260k (path, data_type "video" or "image", problem_type, problem, options, solution). problem_type defaults
    to "numerical"; "multiple choice" needs a non-empty list of options. A row with an unknown problem_type or
    data_type is bad. Bad rows are reported (SkipSummary: the first 3 of each reason, then counts) and dropped; when `skipped` is
    a list, each is also appended to it as {"index", "video" (None if unknown), "reason"}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_examples: no such file {path}")
    root = Path(video_root) if video_root is not None else path.parent
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON list of records; "line" below is then the record number
        try:
            rows = [(i, rec, None) for i, rec in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise ValueError(f"load_examples: {path} is not valid JSON: {e}") from e
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line), None))
            except json.JSONDecodeError as e:
                rows.append((i, None, f"invalid JSON ({e.msg})"))
    examples, skips = [], SkipSummary(stream=sys.stderr if verbose else None)
    for i, row, err in rows:
        video = None
        if err is None and not isinstance(row, dict):
            err = f"expected an object, got {type(row).__name__}"
        video_key = "path" if err is None and "video_filename" not in row and "path" in row else "video_filename"
        for key in (video_key, "problem", "solution"):
            if err is None and not isinstance(row.get(key), str):
                err = f"field {key!r} missing or not a string"
        if err is None:
            err = _answer_type_error(row)
        if err is None:
            video = os.path.abspath(root / os.path.expanduser(row[video_key]))  # absolute paths stay as is
            if not os.path.isfile(video):
                err = f"{row.get('data_type', 'video')} file not found: {video}"
        if err is not None:
            skips.add(f"{path}:{i}: skipped", err, video)
            if skipped is not None:
                skipped.append({"index": i, "video": video, "reason": err})
            continue
        examples.append({**row, "video": video, "data_type": row.get("data_type", "video"),  # every column the row has
                         "problem_type": row.get("problem_type", "numerical"), "options": row.get("options") or [],
                         "index": i})
    if not examples:  # the caller reports it in one line
        raise ValueError(f"load_examples: no usable row in {path} (video_root={root})")
    if verbose:
        print("\n".join([f"loaded {len(examples)} of {len(rows)} rows from {path}, skipped {len(rows) - len(examples)}",
                         *skips.summary()]), file=sys.stderr)
    return examples


def _answer_type_error(row):
    """Why a row's data_type / problem_type / options cannot be used, else None."""
    if row.get("data_type", "video") not in ("video", "image"):
        return f"data_type {row['data_type']!r} is neither video nor image"
    problem_type = row.get("problem_type", "numerical")
    if problem_type not in rewards.PROBLEM_TYPES:
        return f"problem_type {problem_type!r} unknown; known: {list(rewards.PROBLEM_TYPES)}"
    options = row.get("options")
    if options is not None and not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
        return "field 'options' is not a list of strings"
    if problem_type == "multiple choice" and not options:
        return "a multiple choice row needs a non-empty 'options' list"
    return None


# ----------------------------------------------------------------------------- video

def frame_size(height, width, nframes, min_pixels=128 * 28 * 28, max_pixels=0, factor=28, video_max_pixels=0):
    """The (h, w) Video-R1's reader (fetch_video) resizes nframes frames of height x width to. Video-R1's first trainer passed no pixel
    bounds with a video, so its cap was max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2), int(min_pixels * 1.05))
    = 105,369 pixels at min_pixels 128*28*28 (a 640x480 clip: 280x364). max_pixels 0 = that rule; a positive
    max_pixels can only lower the cap, as an explicit `max_pixels` does in fetch_video. factor: patch * merge (Qwen3-VL:
    32, its min_pixels 128*32*32, the same 128 merged patches, and its cap int(1.05 * 128*32*32) = 137,625 pixels).
    video_max_pixels replaces the reader's VIDEO_MAX_PIXELS constant in that rule, as Video-R1's README has one edit its
    copy for evaluation ("256 x 28 x 28"); 0: VIDEO_MAX_PIXELS (128 merged patches of the family)."""
    video_max = video_max_pixels or VIDEO_MAX_PIXELS // 28 ** 2 * factor ** 2
    cap = max(min(video_max, VIDEO_TOTAL_PIXELS / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return smart_resize(height, width, factor, min_pixels, min(max_pixels, cap) if max_pixels > 0 else cap)


def read_video(path, fps=2.0, min_frames=4, max_frames=16, min_pixels=128 * 28 * 28, max_pixels=0, factor=28,
               with_meta=False, video_max_pixels=0):
    """Decode ~fps frames per second, evenly spaced, resized Qwen's way. Returns (frames (T, H, W, 3) uint8, sample_fps),
    with_meta: and {"frame_indices", "video_fps"} (the video's own fps: Qwen3-VL's timestamps need both)."""
    import decord  # imported here: a module that only builds prompts should not need it

    path = str(path)
    decoder = []  # what ffmpeg and decord's C++ code write to fd 2: folded into the one error line, not the log
    try:
        with _decoder_messages(decoder):
            vr = decord.VideoReader(path)
            total, video_fps = len(vr), float(vr.get_avg_fps())
    except Exception as e:  # decord raises a bare RuntimeError (DECORDError) for missing/empty/corrupt files
        raise VideoError(f"read_video: cannot open {path}: {str(e).splitlines()[0]}{_folded(decoder)}") from e
    if total <= 0 or not video_fps > 0:
        raise VideoError(f"read_video: {path} has {total} frames at {video_fps} fps")
    # qwen-vl-utils' smart_nframes: fps-based count, clamped, then floored to an even number
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    nframes = min(max(total / video_fps * fps, lo), hi, total)
    nframes = math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total:
        raise VideoError(f"read_video: {path} is too short ({total} frames) to sample {FRAME_FACTOR}")
    idx = torch.linspace(0, total - 1, nframes).round().long().tolist()  # torch's float32 linspace, as Qwen's
    try:
        with _decoder_messages(decoder):
            frames = vr.get_batch(idx).asnumpy()  # (T, H0, W0, 3) uint8 RGB
    except Exception as e:
        raise VideoError(f"read_video: cannot decode frames of {path}: {str(e).splitlines()[0]}{_folded(decoder)}") from e
    sample_fps = nframes / max(total, 1e-6) * video_fps
    h, w = frame_size(frames.shape[1], frames.shape[2], nframes, min_pixels, max_pixels, factor, video_max_pixels)
    if (h, w) != frames.shape[1:3]:  # torchvision returns the input untouched when the size already matches
        # = torchvision's tensor resize(BICUBIC, antialias=True) on uint8: float32 interpolate, clamp, round
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H0, W0)
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        frames = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    if with_meta:
        return frames, sample_fps, {"frame_indices": idx, "video_fps": video_fps}
    return frames, sample_fps  # (T, h, w, 3) uint8


@contextlib.contextmanager
def _decoder_messages(sink):
    """fd 2 (where ffmpeg and decord's C++ code print, below Python's sys.stderr) into a temporary file for the block;
    its text is appended to sink."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sink.append(captured.read().decode(errors="replace"))


def _folded(messages):
    """The decoder's lines as one suffix, their prefixes ("[12:00:00] src/video/video_reader.cc:83: ", "[mov,mp4 @
    0x55..] ") dropped: " (decoder: ERROR opening: x.mp4, Invalid data ...; moov atom not found)"."""
    lines = [re.sub(r"^(\[[^\]]*\] )?(\S+\.cc:\d+: )?", "", line).strip() for text in messages for line in text.splitlines()]
    lines = list(dict.fromkeys(line for line in lines if line))
    return f" (decoder: {'; '.join(lines)})" if lines else ""


def video_to_patches(frames, patch_size=14, temporal_patch_size=2, merge_size=2, mean=CLIP_MEAN, std=CLIP_STD):
    """Qwen2-VL's video patches: (grid_t*grid_h*grid_w, 3*tps*ps*ps) float32 and video_grid_thw (1, 3)."""
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    T, C, H, W = x.shape
    assert C == 3 and H % (patch_size * merge_size) == 0 and W % (patch_size * merge_size) == 0, \
        f"video_to_patches: frames {tuple(x.shape)} need 3 channels and sides divisible by {patch_size * merge_size}"
    # rescale (1/255) fused into normalise, exactly as transformers computes it: (x - 255*mean) / (255*std)
    mean255 = (torch.tensor(mean, dtype=torch.float32) * 255.0).view(1, 3, 1, 1)
    std255 = (torch.tensor(std, dtype=torch.float32) * 255.0).view(1, 3, 1, 1)
    x = (x - mean255) / std255
    if T % temporal_patch_size:  # pad time by repeating the last frame
        x = torch.cat([x, x[-1:].expand(temporal_patch_size - T % temporal_patch_size, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // temporal_patch_size, H // patch_size, W // patch_size
    x = x.view(gt, temporal_patch_size, C, gh // merge_size, merge_size, patch_size,
               gw // merge_size, merge_size, patch_size)
    # -> (gt, gh/m, gw/m, m, m, C, tps, ps, ps): the 2x2 merged patches are contiguous, as the LLM expects
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(gt * gh * gw, C * temporal_patch_size * patch_size * patch_size).contiguous()
    return pixel_values, torch.tensor([[gt, gh, gw]], dtype=torch.long)


@dataclass
class VideoSettings:
    """How a video becomes model input: sampling and pixel bounds (trainer config) + patch layout (model)."""
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    min_pixels: int = 0  # 0: 128 merged patches of the model (128*28*28 Qwen2/2.5-VL, 128*32*32 Qwen3-VL)
    max_pixels: int = 0  # 0: Video-R1's reader's cap (frame_size)
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    frame_timestamps: bool = False  # Qwen3-VL: "<t seconds>" before each group of temporal_patch_size frames
    video_max_pixels: int = 0  # 0: the reader's VIDEO_MAX_PIXELS, 128 merged patches (frame_size)
    image_min_pixels: int = 0  # 0: 4 merged patches (Video-R1's reader: 4*28*28)
    image_max_pixels: int = 0  # 0: 256 merged patches (Video-R1's reader: 256*28*28)
    image_bounds: tuple = (0, 0)  # the image processor's own (min, max) pixels (preprocessor_config.json); 0: none
    video_time: str = "true"  # seconds per temporal patch: "true" 2 / sample fps; "video-r1" 1.0 (VIDEO_TIMES)

    def __post_init__(self):  # Video-R1's first trainer's 128*28*28 is 128 merged patches; a family with 32-px ones gets 128*32*32
        self.min_pixels = self.min_pixels or 128 * self.factor ** 2
        self.image_min_pixels = self.image_min_pixels or vision.IMAGE_MIN_PATCHES * self.factor ** 2
        self.image_max_pixels = self.image_max_pixels or vision.IMAGE_MAX_PATCHES * self.factor ** 2

    @property
    def factor(self):
        """The side multiple of a resized frame: one merged patch."""
        return self.patch_size * self.merge_size


# the families whose processor (Qwen3VLProcessor: Qwen3.5 has none of its own) puts "<t seconds>" before each frame group
TIMESTAMPED = ("qwen3_vl", "qwen3_5")
# the trainer's flags that set VideoSettings (train.py, eval.py and data.py --check/--show alike)
SETTING_FLAGS = ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "video_max_pixels", "image_min_pixels",
                 "image_max_pixels", "video_time")
# --video_time: "true" places Qwen2.5-VL's video in time by the sampled fps (its processor given the fps, as Video-R1's
# eval script does); "video-r1" as Video-R1's later trainer trained: its processor called without the fps (default 2.0,
# so second_per_grid_ts 2 / 2.0) and second_per_grid_ts deleted before the log-prob passes (grpo_trainer.py; get_rope_index
# then takes 1.0): 1.0 s per temporal patch in every pass
VIDEO_TIMES = ("true", "video-r1")


def video_settings_from_pretrained(model_dir, **overrides):
    """Patch layout and normalisation from model_dir's video_preprocessor_config.json, else its preprocessor_config.json
    (if any); image_bounds from its preprocessor_config.json (the image processor's); frame_timestamps from config.json's
    model_type (TIMESTAMPED); the rest from overrides. video_time "video-r1" on a family that reads no second_per_grid_ts
    (all but Qwen2.5-VL): ValueError."""
    names = {f.name for f in fields(VideoSettings)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"video_settings_from_pretrained: unknown settings {sorted(unknown)}; known: {sorted(names)}")
    values = {}
    cfg_path = Path(model_dir) / "video_preprocessor_config.json" if model_dir else None
    if cfg_path is not None and not cfg_path.is_file():
        cfg_path = cfg_path.with_name("preprocessor_config.json")
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        # only the patch layout: its min/max_pixels are the *image* bounds, not the video ones we train with
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            if key in cfg:
                values[key] = tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]
    image_cfg = Path(model_dir) / "preprocessor_config.json" if model_dir else None
    if image_cfg is not None and image_cfg.is_file():
        values["image_bounds"] = vision.processor_bounds(json.loads(image_cfg.read_text()))
    config_path = Path(model_dir) / "config.json" if model_dir else None
    model_type = json.loads(config_path.read_text()).get("model_type") if config_path is not None and config_path.is_file() else None
    if model_type is not None:
        values["frame_timestamps"] = model_type in TIMESTAMPED
    values.update(overrides)
    if values.get("video_time", "true") not in VIDEO_TIMES:
        raise ValueError(f"--video_time {values['video_time']!r}: one of {VIDEO_TIMES}")
    if values.get("video_time") == "video-r1" and model_type not in (None, "qwen2_5_vl"):
        raise ValueError(f"--video_time video-r1: {model_type} reads no second_per_grid_ts (only Qwen2.5-VL places video "
                         f"in time by it); leave --video_time true")
    return VideoSettings(**values)


# ----------------------------------------------------------------------------- prompts

def format_question(problem, problem_type="numerical", options=None, template=None, prompt_template="default"):
    """The question text for one row: its type's template (or `template`: eval's video-r1-first protocol asks with Video-R1's first trainer eval
    script's words); multiple choice lists the options, one a line. prompt_template "video-r1" / "video-r1-eval":
    Video-R1's question built as its code builds it (options verbatim, each followed by a newline)."""
    if prompt_template in VIDEO_R1_TEMPLATES:
        question_template, suffixes = VIDEO_R1_TEMPLATES[prompt_template]
        question = problem + "Options:\n" + "".join(o + "\n" for o in options or []) if problem_type == "multiple choice" else problem
        return question_template.format(Question=question) + suffixes[problem_type]
    assert prompt_template == "default", f"prompt_template {prompt_template!r}: choose one of {PROMPT_TEMPLATE_NAMES}"
    # options that carry no letter get their place's letter, as rewards.parse_options reads them
    lettered = [o.strip() if _has_letter(o) else f"{chr(ord('A') + i)}. {o.strip()}" for i, o in enumerate(options or [])]
    return (template or PROMPT_TEMPLATES[problem_type]).format(problem=problem, options="\n".join(lettered))


def _has_letter(option):
    m = rewards._OPTION.fullmatch(option.strip())
    return m is not None and m.group(2) is not None


def build_prompt_text(tokenizer, problem, problem_type="numerical", options=None, template=None, prompt_template="default",
                      data_type="video"):
    """The chat-formatted prompt (one video, or one image for data_type "image", then the question, as Video-R1's
    conversation puts them), ending with the assistant turn opener."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"build_prompt_text: tokenizer {type(tokenizer).__name__} has no chat template")
    part, placeholder = MEDIA[data_type][:2]
    question = format_question(problem, problem_type, options, template, prompt_template)
    messages = [{"role": "user", "content": [{"type": part}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(placeholder) != 1:
        raise ValueError(f"build_prompt_text: chat template must render exactly one {placeholder}, got: {text!r}")
    return text


def video_timestamps(frame_indices, video_fps, temporal_patch_size=2):
    """Qwen3-VL's time of each group of temporal_patch_size frames, in seconds: the mean of its first and last frame's
    seconds (index / the video's own fps), the last frame repeated to fill the last group (transformers 5.23's
    Qwen3VLProcessor._calculate_timestamps). In that order: (a + b) / 2 / fps rounds otherwise at x.x5 (a 71-frame
    30-fps clip: 1.9 against the processor's 2.0 seconds)."""
    idx = list(frame_indices) + [frame_indices[-1]] * (-len(frame_indices) % temporal_patch_size)
    return [(idx[i] / video_fps + idx[i + temporal_patch_size - 1] / video_fps) / 2 for i in range(0, len(idx), temporal_patch_size)]


def timestamped_video(video_grid_thw, timestamps, merge_size=2):
    """What replaces the chat template's <|video_pad|> for Qwen3-VL: per temporal group
    `<t seconds><|vision_start|><|video_pad|> x (h*w/merge^2)<|vision_end|>`, t with one decimal. The template's own
    <|vision_start|>...<|vision_end|> stay around all groups, as in transformers 5.23 (which replaces the pad only)."""
    t, h, w = (int(v) for v in torch.as_tensor(video_grid_thw).reshape(-1, 3)[0])
    assert len(timestamps) == t, f"timestamped_video: {len(timestamps)} timestamps for {t} temporal groups"
    group = "<|vision_start|>" + "<|video_pad|>" * (h * w // merge_size ** 2) + "<|vision_end|>"
    return "".join(f"<{s:.1f} seconds>{group}" for s in timestamps)


def encode_prompt(tokenizer, prompt_text, video_grid_thw, merge_size=2, timestamps=None, data_type="video"):
    """Tokenize and expand the one <|video_pad|> (data_type "image": <|image_pad|>, its grid in video_grid_thw's place)
    into one token per merged patch. Returns (input_ids, mm_token_type_ids). With timestamps (Qwen3-VL's videos:
    video_timestamps) the pad becomes timestamped_video's text before tokenizing, as its processor does."""
    pad_token, kind = MEDIA[data_type][2:]
    video_pad = tokenizer.convert_tokens_to_ids(pad_token)
    if timestamps is not None:
        if prompt_text.count("<|video_pad|>") != 1:
            raise ValueError(f"encode_prompt: expected one <|video_pad|> in the prompt, found {prompt_text.count('<|video_pad|>')}")
        text = prompt_text.replace("<|video_pad|>", timestamped_video(video_grid_thw, timestamps, merge_size))
        input_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        n = int(torch.as_tensor(video_grid_thw).prod()) // merge_size ** 2
        assert int((input_ids == video_pad).sum()) == n, f"encode_prompt: the timestamped prompt has not {n} video tokens"
        return input_ids, (input_ids == video_pad).long() * 2
    ids = torch.tensor(tokenizer(prompt_text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (L0,)
    where = (ids == video_pad).nonzero().flatten()
    if len(where) != 1:
        raise ValueError(f"encode_prompt: expected one {pad_token} token (id {video_pad}), found {len(where)}")
    n = int(torch.as_tensor(video_grid_thw).reshape(-1, 3)[0].prod()) // merge_size ** 2
    pos = int(where[0])
    input_ids = torch.cat([ids[:pos], torch.full((n,), video_pad, dtype=torch.long), ids[pos + 1:]])  # (L0 - 1 + n,)
    mm_token_type_ids = (input_ids == video_pad).long() * kind  # 0 text, 1 image, 2 video (transformers' convention)
    return input_ids, mm_token_type_ids


# ----------------------------------------------------------------------------- dataset and batching

def frame_permutation(num_frames, seed):
    """T-GRPO's frame order: a random permutation of range(num_frames) from `seed`, never the identity (when
    num_frames > 1: an unshuffled "shuffled" video would make the contrast meaningless). (num_frames,) long"""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(num_frames, generator=generator)
        if num_frames < 2 or not torch.equal(perm, torch.arange(num_frames)):
            return perm


def shuffled_copy(batch):
    """T-GRPO's rollout batch: the B prompts, then the same prompts of the video rows on their shuffled videos (B + V
    rows; image rows get no shuffled copy, as in Video-R1's `if self.temporal and video_inputs`). The prompts are
    identical (a shuffled video has the same grid, so the same number of video tokens): one batched rollout."""
    videos = [b for b, kind in enumerate(batch.get("data_type") or ["video"] * len(batch["input_ids"])) if kind == "video"]
    rows = torch.tensor(list(range(len(batch["input_ids"]))) + videos, device=batch["input_ids"].device)  # (B + V,)
    doubled = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    doubled.update({k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch})  # images: once, first rows
    if videos:
        assert "pixel_values_videos_shuffled" in batch, "shuffled_copy needs a dataset built with shuffled_frames=True"
        doubled.update({k: torch.cat([batch[k], batch[k]]) for k in ("video_grid_thw", "second_per_grid_ts") if k in batch})
        doubled["pixel_values_videos"] = torch.cat([batch["pixel_values_videos"], batch["pixel_values_videos_shuffled"]])
    elif "second_per_grid_ts" in batch:
        doubled["second_per_grid_ts"] = batch["second_per_grid_ts"]
    return doubled


class VideoPromptDataset(torch.utils.data.Dataset):
    """Examples -> model inputs. A bad video or an over-long prompt gives an {"error": ...} item, never an exception.
    shuffled_frames=True adds "pixel_values_videos_shuffled" (T-GRPO): the frames put in random order BEFORE patching.
    (With temporal_patch_size 2 a patch holds two frames, so shuffling frames is not a permutation of patch rows.)
    The order comes from (shuffle_seed, example index): the same for a video in every epoch, and on resume."""

    def __init__(self, examples, tokenizer, settings, max_prompt_length=None, template=None,
                 shuffled_frames=False, shuffle_seed=0, prompt_template="default"):
        self.examples, self.tokenizer, self.s, self.max_prompt_length = examples, tokenizer, settings, max_prompt_length
        self.template = template  # None: each row's problem_type's; eval's video-r1-first protocol: Video-R1's first eval script's words
        self.prompt_template = prompt_template  # a PROMPT_TEMPLATE_NAMES entry: whose words each type is asked in
        self.shuffled_frames, self.shuffle_seed = shuffled_frames, shuffle_seed

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex, s = self.examples[i], self.s
        meta = {"video": ex["video"], "problem": ex["problem"], "solution": ex["solution"], "index": i,
                "problem_type": ex.get("problem_type", "numerical"), "options": ex.get("options") or [],
                "data_type": ex.get("data_type", "video")}
        meta["columns"] = {**ex, **{k: meta[k] for k in ("video", "problem_type", "options", "data_type")}}  # the rewards'
        if meta["data_type"] == "image":
            return self.image_item(ex, meta)
        try:
            frames, sample_fps, info = read_video(ex["video"], s.fps, s.min_frames, s.max_frames, s.min_pixels,
                                                  s.max_pixels, s.factor, with_meta=True, video_max_pixels=s.video_max_pixels)
        except VideoError as e:
            return {"error": str(e), **meta}
        pixel_values, grid_thw = video_to_patches(frames, s.patch_size, s.temporal_patch_size, s.merge_size,
                                                  s.image_mean, s.image_std)
        text = build_prompt_text(self.tokenizer, ex["problem"], meta["problem_type"], meta["options"], self.template,
                                 self.prompt_template)
        timestamps = video_timestamps(info["frame_indices"], info["video_fps"], s.temporal_patch_size) if s.frame_timestamps else None
        input_ids, mm_token_type_ids = encode_prompt(self.tokenizer, text, grid_thw, s.merge_size, timestamps)
        if self.max_prompt_length is not None and len(input_ids) > self.max_prompt_length:
            # never truncate: cutting into the video tokens would break the model
            return {"error": f"{ex['video']}: prompt has {len(input_ids)} tokens > max_prompt_length "
                             f"{self.max_prompt_length}", **meta}
        # seconds per temporal patch: Qwen2.5-VL's temporal positions count time (its processor's formula)
        second_per_grid_ts = torch.tensor([s.temporal_patch_size / sample_fps])
        item = {"input_ids": input_ids, "mm_token_type_ids": mm_token_type_ids, "pixel_values_videos": pixel_values,
                "video_grid_thw": grid_thw, "second_per_grid_ts": second_per_grid_ts, "timestamps": timestamps,
                "frame_indices": info["frame_indices"], "video_fps": info["video_fps"], **meta}
        if s.video_time == "video-r1":  # Video-R1's later trainer: 1.0 s per temporal patch in every pass (VIDEO_TIMES)
            second_per_grid_ts = torch.tensor([1.0])
        item["second_per_grid_ts"] = second_per_grid_ts
        if self.shuffled_frames:
            perm = frame_permutation(len(frames), self.shuffle_seed * 1_000_003 + i)
            item["pixel_values_videos_shuffled"] = video_to_patches(frames[perm.numpy()], s.patch_size, s.temporal_patch_size,
                                                                    s.merge_size, s.image_mean, s.image_std)[0]
        return item

    def image_item(self, ex, meta):
        """An image row: read as Video-R1's reader (vision.read_image), resized to the image processor's bounds, its
        patch rows those of the image repeated to the temporal patch (pixel_values, image_grid_thw (1, 3) with t = 1),
        the prompt's image block one <|image_pad|> per merged patch. T-GRPO shuffles nothing here."""
        s = self.s
        try:
            image = vision.read_image(ex["video"], s.image_min_pixels, s.image_max_pixels, s.factor)  # (H, W, 3) uint8
            image = vision.processor_resize(image, s.image_bounds, s.factor)
        except vision.ImageError as e:
            return {"error": str(e), **meta}
        frames = np.repeat(image[None], s.temporal_patch_size, axis=0)                     # (tps, H, W, 3)
        pixel_values, grid_thw = video_to_patches(frames, s.patch_size, s.temporal_patch_size, s.merge_size,
                                                  s.image_mean, s.image_std)               # (h*w, 3*tps*ps*ps), (1, 3)
        text = build_prompt_text(self.tokenizer, ex["problem"], meta["problem_type"], meta["options"], self.template,
                                 self.prompt_template, data_type="image")
        input_ids, mm_token_type_ids = encode_prompt(self.tokenizer, text, grid_thw, s.merge_size, data_type="image")
        if self.max_prompt_length is not None and len(input_ids) > self.max_prompt_length:
            return {"error": f"{ex['video']}: prompt has {len(input_ids)} tokens > max_prompt_length "
                             f"{self.max_prompt_length}", **meta}
        return {"input_ids": input_ids, "mm_token_type_ids": mm_token_type_ids, "pixel_values": pixel_values,
                "image_grid_thw": grid_thw, "image_size": list(image.shape[:2]), **meta}


def collate(items, pad_token_id):
    """Left-pad the good items into a batch (generation appends on the right); error items go to batch["skipped"]."""
    good = [it for it in items if "error" not in it]
    batch = {key: [it[key] for it in good] for key in ("problem", "solution", "video", "index")}
    # every column of the rows, one list per name (None where a row lacks it): the rewards take what they name
    names = dict.fromkeys(name for it in good for name in it.get("columns", {}))
    batch["columns"] = {name: [it.get("columns", {}).get(name) for it in good] for name in names}
    batch["data_type"] = [it.get("data_type", "video") for it in good]
    batch["skipped"] = [it for it in items if "error" in it]
    if not good:
        return batch  # B = 0: the trainer decides what to do
    B, L = len(good), max(len(it["input_ids"]) for it in good)
    batch["input_ids"] = torch.full((B, L), pad_token_id, dtype=torch.long)
    batch["attention_mask"] = torch.zeros(B, L, dtype=torch.long)
    batch["mm_token_type_ids"] = torch.zeros(B, L, dtype=torch.long)
    for b, it in enumerate(good):
        n = len(it["input_ids"])
        batch["input_ids"][b, L - n:] = it["input_ids"]
        batch["attention_mask"][b, L - n:] = 1
        batch["mm_token_type_ids"][b, L - n:] = it["mm_token_type_ids"]
    # each kind's patch rows and grids in row order, present only when a row has one (the model passes read them so)
    videos, images = [it for it in good if "video_grid_thw" in it], [it for it in good if "image_grid_thw" in it]
    if images:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in images])       # (sum N_i, 1176)
        batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in images])   # (I, 3)
    if videos:
        batch["pixel_values_videos"] = torch.cat([it["pixel_values_videos"] for it in videos])  # (sum N_i, 1176)
        batch["video_grid_thw"] = torch.cat([it["video_grid_thw"] for it in videos])   # (V, 3)
    if videos and "pixel_values_videos_shuffled" in videos[0]:
        batch["pixel_values_videos_shuffled"] = torch.cat([it["pixel_values_videos_shuffled"] for it in videos])
    if all("second_per_grid_ts" in it for it in videos):  # items built by hand may leave it out (Qwen2-VL needs none)
        batch["second_per_grid_ts"] = torch.cat([it["second_per_grid_ts"] for it in videos]) if videos else torch.zeros(0)  # (V,)
    return batch


def uncollate(batch):
    """collate's inverse: the batch's examples as items, unpadded, so that examples of several batches can be collated
    into one (train.py --dynamic_sampling). collate(uncollate(batch), pad_token_id) equals the batch."""
    per = {}  # key -> that kind's rows, one entry per image (or video) in row order
    for grid, keys in (("image_grid_thw", ("pixel_values",)),
                       ("video_grid_thw", ("pixel_values_videos", "pixel_values_videos_shuffled"))):
        if grid in batch:
            sizes = batch[grid].prod(1).tolist()  # patch rows per image / video
            per.update({k: batch[k].split(sizes) for k in keys if k in batch}, **{grid: batch[grid].split(1)})
    if "second_per_grid_ts" in batch:
        per["second_per_grid_ts"] = batch["second_per_grid_ts"].split(1)
    items, seen = [], {"image": 0, "video": 0}
    for b in range(len(batch["solution"])):
        keep, kind = batch["attention_mask"][b].bool(), batch["data_type"][b]
        item = {k: batch[k][b] for k in ("problem", "solution", "video", "index", "data_type")}
        item["columns"] = {name: values[b] for name, values in batch["columns"].items() if values[b] is not None}
        item.update({k: batch[k][b][keep] for k in ("input_ids", "mm_token_type_ids")})
        mine = ("pixel_values", "image_grid_thw") if kind == "image" else (
            "pixel_values_videos", "pixel_values_videos_shuffled", "video_grid_thw", "second_per_grid_ts")
        item.update({k: per[k][seen[kind]] for k in mine if k in per})
        seen[kind] += 1
        items.append(item)
    return items


def epoch_order(num_examples, epoch, *, seed, rank, world, batch_size):
    """This rank's example indices for one epoch: one shuffle per epoch from Video-R1's first trainer, the tail that cannot fill a
    step on every rank dropped, rank r taking every world-th index (ranks never share a prompt)."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_step = world * batch_size
    return order[:len(order) // per_step * per_step][rank::world]


def ignore_sigterm(worker_id):
    """DataLoader workers outlive a SIGTERM: a launcher or scheduler signals the whole process tree, and a worker
    killed by it makes its rank raise before the rank can finish the step and save. The rank stops them itself
    (kill_workers, at exit)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def kill_workers():
    """At the rank's exit, SIGKILL the loader workers still alive. They ignore SIGTERM, and one blocked writing a batch
    to a pipe the rank no longer reads would otherwise hang the exit: multiprocessing joins its children after a
    SIGTERM that no longer ends them. Registered with atexit after multiprocessing's own handler, so it runs first."""
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


def batches_from(dataset, position, loader_kwargs, **order_kwargs):
    """(epoch, batch index, batch) from position = (epoch, batch index) on, epoch after epoch; a resumed run
    starts mid-epoch without decoding the videos before it."""
    epoch, start = position
    batch_size = order_kwargs["batch_size"]
    if loader_kwargs.get("num_workers", 0) > 0:
        atexit.unregister(kill_workers)  # once, however many runs this process makes
        atexit.register(kill_workers)
    while True:
        order = epoch_order(len(dataset), epoch, **order_kwargs)[start * batch_size:]
        # the loader's own generator: creating an iterator must not draw from the global RNG the rollout samples with
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, generator=torch.Generator(),
                                             worker_init_fn=ignore_sigterm, **loader_kwargs)
        for i, batch in enumerate(loader, start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0


def next_batch(run):
    """train.py's next batch of this rank (run: train.Run), on the device; a batch whose every video failed is replaced
    by the next one (every rank must take the step). A rank that cannot draw one makes every rank raise
    (runtime.raise_together), so none waits in the step's collectives. Failed examples go to run.skips (the first 3 of
    each reason printed, counts at the end). Returns (epoch, batch_index, batch, examples failed, examples tried)."""
    failed, tried, error = 0, 0, None
    try:
        while True:
            epoch, batch_index, batch = next(run.batches)
            for item in batch["skipped"]:
                run.skips.add("skipped", item["error"], item["video"])
            failed, tried = failed + len(batch["skipped"]), tried + len(batch["skipped"]) + len(batch["solution"])
            if batch["solution"]:
                break
            if tried >= run.cfg.skip_window * run.cfg.prompts_per_device:
                raise RuntimeError(f"rank {run.rank}: the last {tried} examples all failed to load (see the warnings above)")
    except Exception as e:  # noqa: BLE001 -- re-raised on this rank, after every rank has heard of it
        error = e
    runtime.raise_together(error, run.device)
    batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return epoch, batch_index, batch, failed, tried


# ----------------------------------------------------------------------------- synthetic counting dataset

COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30)}
SHAPES = ("square", "circle")


def _sample_scene(rng, size, num_frames, tries=2000):
    """1-5 shapes with constant velocities (some static) bouncing off the borders, never overlapping, so that
    every object stays countable in every frame. Returns (objects, positions (T, n, 2) as (y, x) centres)."""
    lim, n = np.array(size, dtype=float), int(rng.integers(1, 6))  # (H, W); n is drawn once: counts stay uniform
    for _ in range(tries):  # rejection sampling: redraw the scene until no two shapes ever touch
        r = rng.integers(size[0] // 14, size[0] // 10 + 1, size=n).astype(float)  # 8-11 px radius at 112x112
        shape = rng.choice(SHAPES, size=n)
        moving = rng.random(n) < 0.6
        angle = rng.uniform(0, 2 * np.pi, size=n)
        vel = rng.uniform(1.5, 4.0, size=n)[:, None] * np.stack([np.sin(angle), np.cos(angle)], 1) * moving[:, None]
        lo, hi = r[:, None], lim - 1 - r[:, None]  # (n, 1), (n, 2): allowed centres
        pos, path = rng.uniform(lo, hi), []
        for _ in range(num_frames):
            path.append(pos)
            pos = pos + vel
            out = (pos < lo) | (pos > hi)
            vel = np.where(out, -vel, vel)  # bounce: reflect the velocity and the overshoot
            pos = np.clip(np.where(pos < lo, 2 * lo - pos, np.where(pos > hi, 2 * hi - pos, pos)), lo, hi)
        path = np.stack(path)  # (T, n, 2)
        reach = r * np.where(shape == "square", 1.42, 1.0)  # a square's corners reach r*sqrt(2)
        dist = np.linalg.norm(path[:, :, None] - path[:, None], axis=-1)  # (T, n, n)
        if np.all((dist >= reach[:, None] + reach[None] + 2) | np.eye(n, dtype=bool)):
            objects = [{"color": str(rng.choice(list(COLORS))), "shape": str(shape[k]), "r": r[k],
                        "moving": bool(moving[k])} for k in range(n)]
            return objects, path
    raise RuntimeError(f"_sample_scene: no overlap-free scene in {tries} tries for size {size}")


def _write_clip(path, objects, positions, size, fps):
    """Render the shapes at positions (T, n, 2) on a grey background and encode an H.264 mp4."""
    import av

    H, W = size
    with av.open(str(path), "w") as container:
        # PyAV wheels bundle libx264; if a build lacks it, "mpeg4" (MPEG-4 Part 2) is a drop-in fallback
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":  # lossless: decoded, every fresh copy is the same clips, to the pixel (at crf 18 a
            stream.options = {"qp": "0", "threads": "1"}  # quarter of the clips decoded differently in each process)
        for frame_pos in positions:
            img = _render_frame(objects, frame_pos, size)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def _render_frame(objects, frame_pos, size):
    """The shapes at frame_pos (n, 2) as (y, x) centres on a plain grey background. (H, W, 3) uint8"""
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.full((H, W, 3), 90, dtype=np.uint8)  # (H, W, 3)
    for o, (cy, cx) in zip(objects, frame_pos):
        if o["shape"] == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= o["r"] ** 2
        else:
            mask = (abs(yy - cy) <= o["r"]) & (abs(xx - cx) <= o["r"])
        img[mask] = COLORS[o["color"]]
    return img


def _make_example(rng, name, size, num_frames, fps, out_dir):
    """One clip and one counting question about it (colour, shape, motion or total), as a DVD-counting row."""
    objects, positions = _sample_scene(rng, size, num_frames)
    for o, (y, x) in zip(objects, positions[0]):
        o["y"], o["x"] = float(y), float(x)  # where it starts, left to right (_make_260k_row); the image rows' frame
    pick = objects[int(rng.integers(len(objects)))]  # ask about a colour/shape in the scene: fewer trivial 0s
    color, shape = pick["color"], pick["shape"]
    problem, n = [(f"How many {color} objects are in the video?", sum(o["color"] == color for o in objects)),
                  (f"How many {shape}s are there?", sum(o["shape"] == shape for o in objects)),
                  ("How many objects are moving?", sum(o["moving"] for o in objects)),
                  ("How many objects are there in total?", len(objects))][int(rng.integers(4))]
    _write_clip(out_dir / "videos" / f"{name}.mp4", objects, positions, size, fps)
    return {"video_filename": f"./videos/{name}.mp4", "problem": problem, "solution": f"<answer>{n}</answer>"}, objects


def _make_mc_example(rng, video_filename, objects):
    """A 4-option multiple-choice question about a clip's objects: the total count, or the shape of a colour that
    only one object has. The right option's letter is uniform over A-D."""
    colors = [o["color"] for o in objects]
    unique = [o for o in objects if colors.count(o["color"]) == 1]
    if unique and rng.random() < 0.5:
        pick = unique[int(rng.integers(len(unique)))]
        problem, right, wrong = (f"What shape is the {pick['color']} object?", pick["shape"],
                                 [s for s in ("square", "circle", "triangle", "star") if s != pick["shape"]])
    else:
        problem, right = "How many objects are there in total?", str(len(objects))
        wrong = [str(k) for k in range(0, 8) if k != len(objects)]
    choices = [right] + [str(w) for w in rng.choice(wrong, size=3, replace=False)]
    order = rng.permutation(4)
    options = [f"{'ABCD'[k]}. {choices[j]}" for k, j in enumerate(order)]
    letter = "ABCD"[int(np.flatnonzero(order == 0)[0])]
    return {"video_filename": video_filename, "problem": problem, "problem_type": "multiple choice",
            "options": options, "solution": f"<answer>{letter}</answer>"}


def _make_260k_row(i, counting, mc, objects, image=None):
    """Row i about one clip in Video-R1-260k's layout (a JSON list record: problem_id, problem, data_type, problem_type,
    options, process, solution, path, data_source), its problem_type the i-th of rewards.PROBLEM_TYPES in turn:
    numerical (the counting question), multiple choice (the mc question), free-form (describe the objects), OCR (read
    out their colours), regression (the widest object's width in pixels). Objects are named left to right. image: the
    path of the clip's first frame as a PNG: an image row about it instead (the same answers hold in that frame), its
    type two further along, and "video" in the questions becomes "image"."""
    problem_type = rewards.PROBLEM_TYPES[(i + (2 if image else 0)) % len(rewards.PROBLEM_TYPES)]
    named = sorted(objects, key=lambda o: o["x"])  # by x in the first frame
    problem, options, answer = {
        "numerical": (counting["problem"], [], counting["solution"][len("<answer>"):-len("</answer>")]),
        "multiple choice": (mc["problem"], mc["options"], mc["solution"][len("<answer>"):-len("</answer>")]),
        "free-form": ("Describe the objects in the video from left to right.", [],
                      ", ".join(f"a {o['color']} {o['shape']}" for o in named)),
        "OCR": ("Read out the colours of the objects from left to right.", [], " ".join(o["color"] for o in named)),
        "regression": ("How wide, in pixels, is the widest object?", [], f"{2 * max(o['r'] for o in objects):g}"),
    }[problem_type]
    if image:
        problem = problem.replace("in the video", "in the image")
    return {"problem_id": i, "problem": problem, "data_type": "image" if image else "video", "problem_type": problem_type,
            "options": options, "process": "", "solution": f"<answer>{answer}</answer>",
            "path": image or counting["video_filename"], "data_source": "synthetic"}


def make_synthetic_dataset(out_dir, n_train=64, n_test=32, seed=0, size=(112, 112), num_frames=16, fps=8):
    """Write videos/*.mp4, DVD-counting-style train.jsonl / test.jsonl and, about the same clips, multiple-choice
    train_mc.jsonl / test_mc.jsonl and Video-R1-260k-layout train_260k.json / test_260k.json under out_dir: a video row
    per clip, then an image row per clip about its first frame (images/*.png), all five problem types in turn in each
    (_make_260k_row). size is (H, W). Returns the two counting paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mc_rng = np.random.default_rng([seed, 1])  # its own stream: the counting split is the same with or without it
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        made = [_make_example(rng, f"{split}_{i:05d}", size, num_frames, fps, out_dir) for i in range(n)]
        paths.append(out_dir / f"{split}.jsonl")
        paths[-1].write_text("".join(json.dumps(row) + "\n" for row, _ in made))
        mc = [_make_mc_example(mc_rng, row["video_filename"], objects) for row, objects in made]
        (out_dir / f"{split}_mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in mc))
        rows = [_make_260k_row(i, row, mc[i], objects) for i, (row, objects) in enumerate(made)]
        for i, (row, objects) in enumerate(made):  # the first frame: the objects where the clip starts
            image = f"./images/{split}_{i:05d}.png"
            Image.fromarray(_render_frame(objects, [(o["y"], o["x"]) for o in objects], size)).save(out_dir / image)
            rows.append(_make_260k_row(len(rows), row, mc[i], objects, image=image))
        (out_dir / f"{split}_260k.json").write_text(json.dumps(rows, indent=1))
    return tuple(paths)


# ----------------------------------------------------------------------------- checking a dataset without training

def check_dataset(path, video_root=None, settings=None, progress=True):
    """Read every row and decode every video and image as training would. Returns {"rows", "bad": [{"index", "video",
    "reason"}], "clips": [{"index", "frames", "size": (h, w), "grid": (t, h, w), "video_tokens"}], "images": [{"index",
    "size": (h, w), "grid": (1, h, w), "image_tokens"}]}."""
    from tqdm import tqdm

    s = settings or VideoSettings()
    bad = []
    try:
        examples = load_examples(path, video_root, skipped=bad, verbose=False)
    except ValueError:  # no usable row at all: every row is in `bad` already (or the file is not JSON)
        if not bad:
            raise
        examples = []
    rows, clips, images = len(examples) + len(bad), [], []
    for ex in tqdm(examples, desc=f"decoding {Path(path).name}", unit="file", disable=not progress, file=sys.stderr):
        try:
            if ex.get("data_type") == "image":
                image = vision.processor_resize(vision.read_image(ex["video"], s.image_min_pixels, s.image_max_pixels, s.factor),
                                                s.image_bounds, s.factor)
                grid = (1, image.shape[0] // s.patch_size, image.shape[1] // s.patch_size)
                images.append({"index": ex["index"], "size": image.shape[:2], "grid": grid,
                               "image_tokens": grid[1] * grid[2] // s.merge_size ** 2})
                continue
            frames, _ = read_video(ex["video"], s.fps, s.min_frames, s.max_frames, s.min_pixels, s.max_pixels, s.factor,
                                   video_max_pixels=s.video_max_pixels)
        except (VideoError, vision.ImageError) as e:
            bad.append({"index": ex["index"], "video": ex["video"], "reason": str(e)})
            continue
        T, H, W = frames.shape[:3]
        grid = (-(-T // s.temporal_patch_size), H // s.patch_size, W // s.patch_size)  # as video_to_patches pads time
        clips.append({"index": ex["index"], "frames": T, "size": (H, W), "grid": grid,
                      "video_tokens": grid[0] * grid[1] * grid[2] // s.merge_size ** 2})
    return {"rows": rows, "bad": sorted(bad, key=lambda b: b["index"]), "clips": clips, "images": images}


def format_report(path, report):
    """The --check report: bad rows as FILE:LINE: reason (the first 3 of each reason, then counts per reason), then
    frame/size/grid/token statistics of the good clips."""
    from collections import Counter
    bad = SkipSummary()
    for b in report["bad"]:
        bad.add(f"{path}:{b['index']}: bad", b["reason"], b["video"])
    lines = bad.lines("bad")
    clips, images = report["clips"], report.get("images", [])
    kinds = f" ({len(clips)} videos, {len(images)} images)" if images else ""
    lines.append(f"{path}: {report['rows']} rows, {len(clips) + len(images)} good{kinds}, {len(report['bad'])} bad")
    def stats(key, rows=clips):
        v = [c[key] for c in rows]
        return f"min {min(v)} mean {sum(v) / len(v):.1f} max {max(v)}"

    def counts(key, fmt, rows=clips):
        return ", ".join(f"{fmt(k)}: {n}" for k, n in sorted(Counter(c[key] for c in rows).items()))
    if clips:
        lines += [f"frames per clip: {stats('frames')}",
                  f"frame size (HxW): {counts('size', lambda k: f'{k[0]}x{k[1]}')}",
                  f"grid (t, h, w): {counts('grid', lambda k: f'{k[0]}x{k[1]}x{k[2]}')}",
                  f"video tokens per clip: {stats('video_tokens')}",
                  f"video tokens histogram: {counts('video_tokens', str)}"]
    if images:
        lines += [f"image size (HxW): {counts('size', lambda k: f'{k[0]}x{k[1]}', images)}",
                  f"image tokens per image: {stats('image_tokens', images)}"]
    return "\n".join(lines)


def check_main(args):
    """python data.py --check FILE: exit 0 when every row is usable, 1 when any is bad, 2 when FILE is not there or
    holds no row (empty, not JSON)."""
    if not os.path.isfile(args.check):
        print(f"error: --check {args.check}: no such file", file=sys.stderr)
        return 2
    if args.video_root is not None and not os.path.isdir(args.video_root):
        print(f"error: --video_root {args.video_root}: no such folder", file=sys.stderr)
        return 2
    video = {name: getattr(args, name) for name in SETTING_FLAGS if hasattr(args, name)}  # callers may give fewer
    try:
        settings = video_settings_from_pretrained(args.model_name_or_path, **video)
    except ValueError as e:  # --video_time
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = check_dataset(args.check, args.video_root, settings)
    except ValueError as e:  # no row at all (an empty file) or not JSON: nothing to report row by row
        print(f"error: --check {args.check}: {str(e).removeprefix('load_examples: ')}", file=sys.stderr)
        return 2
    print(format_report(args.check, report))
    return 1 if report["bad"] else 0


# ----------------------------------------------------------------------------- what the model sees

def show_video(video, model_dir, question, settings, problem_type="numerical", options=None, prompt_template="default",
               data_type="video"):
    """One video and question as the model receives them: {"family", "data_type", "frame_indices", "video_fps",
    "frame_size" [h, w], "grid_thw", "video_tokens", "timestamps" (Qwen3-VL, else null), "second_per_grid_ts"
    (Qwen2.5-VL, else null), "prompt" (the training prompt, video expanded), "input_ids", "position_ids" (3 x L,
    model.prompt_positions, the family's rule, on the folder's meta-device skeleton: no weights)}, and
    the patch rows (N, 3*tps*ps*ps) float32. data_type "image": an image row, {"family", "data_type", "image_size" [h, w],
    "grid_thw", "image_tokens", "prompt", "input_ids", "position_ids"} and its patch rows (pixel_values)."""
    import transformers

    import model as model_lib
    s = settings
    family = model_lib.model_family(model_dir)  # an unknown family: ModelError before anything is read
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # the training dataset's own item: what --show prints is what a run feeds the model
    item = VideoPromptDataset([{"video": str(video), "problem": question, "solution": "", "problem_type": problem_type,
                                "options": options or [], "data_type": data_type}], tokenizer, s, prompt_template=prompt_template)[0]
    if "error" in item:
        raise (vision.ImageError if data_type == "image" else VideoError)(item["error"])
    batch = collate([item], tokenizer.pad_token_id)
    positions, _ = model_lib.prompt_positions(model_lib.meta_model(model_dir), batch)  # (3, 1, L)
    input_ids = item["input_ids"]
    common = {"prompt": tokenizer.decode(input_ids), "input_ids": input_ids.tolist(), "position_ids": positions[:, 0].tolist()}
    if data_type == "image":
        grid_thw = item["image_grid_thw"]
        return {"family": family, "data_type": "image", "image_size": item["image_size"], "grid_thw": grid_thw[0].tolist(),
                "image_tokens": int(grid_thw.prod()) // s.merge_size ** 2, **common}, item["pixel_values"]
    grid_thw = item["video_grid_thw"]
    shown = {"family": family, "data_type": "video", "frame_indices": item["frame_indices"], "video_fps": item["video_fps"],
             "frame_size": [int(n) * s.patch_size for n in grid_thw[0, 1:]], "grid_thw": grid_thw[0].tolist(),
             "video_tokens": int(grid_thw.prod()) // s.merge_size ** 2, "timestamps": item["timestamps"],
             # what every pass gets to place the video in time (Qwen2.5-VL; the other families read none)
             "second_per_grid_ts": batch["second_per_grid_ts"].tolist() if family == "qwen2_5_vl" else None, **common}
    return shown, item["pixel_values_videos"]


def show_main(args):
    """python data.py --show VIDEO --model_name_or_path DIR: one JSON object on the last line; exit 2 on bad input. A
    file with an image extension (vision.IMAGE_EXTENSIONS) is shown as an image row."""
    import model as model_lib
    if not args.model_name_or_path:
        print("error: --show needs --model_name_or_path DIR (its tokenizer, processor settings and config)", file=sys.stderr)
        return 2
    if not os.path.isfile(args.show):
        print(f"error: --show {args.show}: no such file", file=sys.stderr)
        return 2
    if args.problem_type not in rewards.PROBLEM_TYPES or (args.problem_type == "multiple choice") != bool(args.options):
        print(f"error: --problem_type {args.problem_type!r}: one of {list(rewards.PROBLEM_TYPES)}; --options only and "
              f"always with multiple choice", file=sys.stderr)
        return 2
    video = {name: getattr(args, name) for name in SETTING_FLAGS if hasattr(args, name)}  # callers may give fewer
    data_type = "image" if args.show.lower().endswith(vision.IMAGE_EXTENSIONS) else "video"
    try:
        shown, pixel_values = show_video(args.show, args.model_name_or_path, args.question,
                                         video_settings_from_pretrained(args.model_name_or_path, **video),
                                         args.problem_type, args.options, args.prompt_template, data_type)
    except (model_lib.ModelError, VideoError, ValueError) as e:  # ValueError: --video_time, vision.ImageError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.save_pixels:
        np.save(args.save_pixels, pixel_values.numpy().astype(np.float32))
        print(f"wrote the {tuple(pixel_values.shape)} patch rows (float32) to {args.save_pixels}", file=sys.stderr)
    print(json.dumps(shown))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", metavar="DIR", help="write a synthetic dataset (counting + multiple choice) to DIR")
    ap.add_argument("--n_train", type=int, default=64)
    ap.add_argument("--n_test", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", metavar="FILE", help="read every row of FILE and decode every video; no training")
    ap.add_argument("--video_root", default=None, help="--check: folder relative video paths start from (default: FILE's)")
    ap.add_argument("--model_name_or_path", default=None, help="--check, --show: model folder whose preprocessor config sets the patch layout")
    ap.add_argument("--show", metavar="VIDEO", help="print what the model sees of VIDEO or an image (JSON, last line); no weights read")
    ap.add_argument("--question", default="How many objects are in the video?", help="--show: the question")
    ap.add_argument("--save_pixels", metavar="FILE.npy", default=None, help="--show: also write the patch rows (float32)")
    ap.add_argument("--problem_type", default="numerical", help=f"--show: the question's type, one of {rewards.PROBLEM_TYPES}")
    ap.add_argument("--options", nargs="+", default=None, help='--show: multiple choice options, e.g. "A. red" "B. blue"')
    ap.add_argument("--prompt_template", default="default", choices=PROMPT_TEMPLATE_NAMES, help="--show: whose words (as train.py)")
    for f in fields(VideoSettings):  # the video and image flags, with train.py's defaults
        if f.name in SETTING_FLAGS:
            ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help="--check, --show: as in train.py")
    args = ap.parse_args()
    if args.show:
        sys.exit(show_main(args))
    if args.check:
        sys.exit(check_main(args))
    if not args.synthetic:
        ap.error("give --synthetic DIR, --check FILE or --show VIDEO")
    train_path, test_path = make_synthetic_dataset(args.synthetic, args.n_train, args.n_test, args.seed)
    print(f"wrote {train_path} ({args.n_train} rows) and {test_path} ({args.n_test} rows), and the multiple-choice "
          f"{train_path.with_name('train_mc.jsonl')} and {test_path.with_name('test_mc.jsonl')} about the same clips")
