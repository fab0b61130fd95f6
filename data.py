"""
Data for GRPO on video: rows (DVD-counting or Video-R1-260k, videos and images), prompts per problem type, batches.
The pixels come from vision.py (decoding, Qwen's resize, the patch layout); the tools (--synthetic, --check, --show)
live in datatools.py.

The pipeline, per example:
    load_examples(jsonl)   -> {"video", "data_type", "problem", "solution", "problem_type", "options", ...} dicts
                              (every other column of the row kept: the rewards take the ones they name)
    vision.read_video()    -> uint8 frames (T, H, W, 3), sampled and resized exactly like qwen-vl-utils' fetch_video
                              (an image row: vision.read_image, Video-R1's fetch_image; its patches are the image
                              repeated to the temporal patch, pixel_values / image_grid_thw, and <|image_pad|>s)
    vision.video_to_patches() -> pixel_values_videos (N, 1176), video_grid_thw (1, 3), as transformers' processor
    build_prompt_text() / encode_prompt() -> input_ids with the video placeholder expanded, mm_token_type_ids
    VideoPromptDataset + collate -> left-padded batches (bad files are skipped, never crash a worker)
    batches_from()         -> each rank's batches, epoch after epoch, from any (epoch, batch) position (exact resume)

    python data.py --synthetic data/synthetic   # a small dataset of moving shapes: counting (train/test.jsonl)
                                                # and multiple choice (train_mc/test_mc.jsonl) about the same clips
    python data.py --check data/synthetic/train.jsonl   # decodes every video: bad rows, frame/token statistics
    python data.py --show VIDEO --model_name_or_path DIR  # what the model sees: frames, grid, prompt ids, positions
    python data.py --show IMAGE.png --model_name_or_path DIR  # the same for an image row
    python data.py --show VIDEO --model_name_or_path DIR --prompt_template video-r1 --problem_type "multiple choice" \
        --question "What colour is the cube?" --options "A. red" "B. blue"   # Video-R1's later prompt for that row
"""
import atexit
import json
import multiprocessing
import os
import re
import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

import rewards
import runtime
import vision
from vision import CLIP_MEAN, CLIP_STD, VideoError, read_video, video_to_patches

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


if __name__ == "__main__":  # the tools (--synthetic, --check, --show) are in datatools.py
    import datatools
    datatools.main()
