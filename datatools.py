"""
data.py's tools, beside the reading path: a synthetic dataset of moving shapes made on first use (--tiny, the tests),
--check (decode every row of a data file, no training) and --show (what the model sees of one video or image). Run
them through data.py:

    python data.py --synthetic data/synthetic   # counting (train/test.jsonl), multiple choice (train_mc/test_mc.jsonl)
                                                # and Video-R1-260k's layout with image rows (train_260k/test_260k.json)
    python data.py --check data/synthetic/train.jsonl
    python data.py --show VIDEO_OR_IMAGE --model_name_or_path DIR
"""
import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

import data
import rewards
import vision
from data import (PROMPT_TEMPLATE_NAMES, SETTING_FLAGS, SkipSummary, VideoPromptDataset, VideoSettings, collate,
                  load_examples, video_settings_from_pretrained)
from vision import VideoError, read_video


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


def main(argv=None):
    """python data.py --synthetic DIR | --check FILE | --show VIDEO_OR_IMAGE (data.py's docstring)."""
    ap = argparse.ArgumentParser(description=data.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = ap.parse_args(argv)
    if args.show:
        sys.exit(show_main(args))
    if args.check:
        sys.exit(check_main(args))
    if not args.synthetic:
        ap.error("give --synthetic DIR, --check FILE or --show VIDEO")
    train_path, test_path = make_synthetic_dataset(args.synthetic, args.n_train, args.n_test, args.seed)
    print(f"wrote {train_path} ({args.n_train} rows) and {test_path} ({args.n_test} rows), and the multiple-choice "
          f"{train_path.with_name('train_mc.jsonl')} and {test_path.with_name('test_mc.jsonl')} about the same clips")

