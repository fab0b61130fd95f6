"""
Evaluate Qwen2-VL, Qwen2.5-VL or Qwen3-VL models on a test set of any answer type (docs/data.md), scored exactly as
training rewards them; several --model flags print one table with a column per model.

    python eval.py --model Qwen/Qwen2-VL-7B-Instruct --data data/dvd/test_dvd.jsonl --output results/base.json
    python eval.py --model Qwen/Qwen2-VL-7B-Instruct --model runs/video-r1-dvd/final --data data/dvd/test_dvd.jsonl
    python eval.py --tiny                            # offline CPU demo: tiny model on the synthetic test split
    python eval.py --tiny --tiny_model qwen3.5       # the same with train.py --tiny --tiny_model qwen3.5's tiny model
    python eval.py --model Qwen/Qwen2-VL-7B-Instruct --data data/dvd/test_dvd.jsonl --protocol video-r1-first   # Video-R1's first trainer's way
    python eval.py --tiny --data data/synthetic/test_mc.jsonl   # the same on the multiple-choice split
    torchrun --nproc_per_node 4 eval.py --model runs/video-r1-dvd/final --data data/dvd/test_dvd.jsonl
    python eval.py --model runs/video-r1-260k/final --data Evaluation/ --protocol video-r1   # Video-R1's benchmark suite
    python eval.py --tiny --protocol video-r1         # the same on the synthetic 260k-layout test split

What is shared with train.py, so that "correct in eval" means "accuracy reward 1.0 in training" and nothing else:
the prompt template of each problem_type, video decoding and settings (data.VideoPromptDataset / collate), the sampler
(sample_completions, here greedy with one completion per prompt), EOS/suppressed tokens, and the scorers
(rewards.accuracy_reward, rewards.format_reward, rewards.extract_answer, rewards.thinking_text).
--protocol video-r1-first instead decodes and scores as Video-R1's first eval script did, so a number can be set beside its table:
its prompt, 256 new tokens, the checkpoint's repetition_penalty, its number parser (VIDEO_R1_FIRST_PROMPT_TEMPLATE, video_r1_first_number).
--protocol video-r1 decodes and scores as Video-R1's later eval script (src/eval_bench.py): its prompt, temperature 0.1,
top_p 0.001, 1,024 new tokens, its answer fallback and reward_fn, one output file per benchmark in its layout
(evaluate_video_r1; docs/video-r1-recipe.md).

Output, one JSON file per model (fractions in [0, 1]; the printed table shows percent):
    {"model", "data", "protocol", "repetition_penalty", "accuracy", "accuracy_by_type", "format_rate",
     "mean_completion_length", "mean_thinking_length", "n", "skipped",
     "results": [{"index", "video", "problem", "problem_type", "solution", "output", "answer", "correct", "format",
                  "completion_length", "thinking_length"}, ...]}
  answer            --protocol train: the text of the last <answer>; video-r1-first: the int its eval script's parser read, or null
  accuracy_by_type  {problem_type: accuracy} over the rows of each type present ("numerical", "multiple choice",
                    "free-form"; rows without a problem_type are numerical)
  index             the row's number in the data file (its line for JSONL, its record for a JSON list), 1-based;
                    results and skipped are sorted by it
  completion_length tokens up to and including the first EOS (training's completion_length metric)
  thinking_length   tokens inside the first <think>...</think> (model's tokenizer), 0 without one
  skipped           [{"index", "video", "reason"}] for every row not evaluated: bad JSON, missing field, missing
                    or unreadable video, over-long prompt; "video" is null when the row failed before a path was known
Where it goes: --output FILE with one model; with several models --output is a folder and each model writes
FOLDER/<model path with / as _>.json. Default: results/<model path with / as _>-<data file stem>.json.

Resuming: each evaluated or skipped row is appended to <output stem>.partial.jsonl (rank r > 0:
<output stem>.partial.rank<r>.jsonl) as it is produced. A re-run with the same --output (and the same flags) skips
the rows found there, keyed by (index, video), and writes the same final file. The partial file's first line
records the model, data and generation settings and a fingerprint of the model's weight files (weights_fingerprint);
a run with other settings refuses to mix into it (one `error:` line, exit 2), a run on other weights in the same folder
starts over, saying so. --protocol video-r1 resumes from its output file by the same rule, and a rerun with a --limit
below the rows already there refuses rather than drop them.
Batches are fixed slices of the rank's rows and a half-done batch is re-run whole, so a resumed run decodes every
example in the same padded batch as an uninterrupted one (left padding can move float results by an ulp).
"""
import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import datatools
import rewards
import runtime
import tiny
from data import VideoSettings
from model import (COMPILE_ROLLOUT, ModelError, check_model_path, completion_mask, decode_completions, generation_repetition_penalty, load_model, model_family,
                   resolve_model_dir, rollout_decode, sample_completions, special_token_ids)


@dataclass
class Config:
    model: list = field(default_factory=list, metadata={"group": "models and data", "help": "model folder or hub id; repeat to compare models side by side"})
    data: str = field(default="", metadata={"group": "models and data", "help": "test JSONL (or JSON list) of video_filename/problem/solution; --protocol video-r1: one or more eval_*.json files or folders of them"})
    video_root: str = field(default="", metadata={"group": "models and data", "help": "folder that relative video paths start from ('': the data file's folder)"})
    output: str = field(default="", metadata={"group": "models and data", "help": "results JSON (one model) or folder (several); '': results/<model>-<data>.json"})
    tiny: bool = field(default=False, metadata={"group": "models and data", "help": "offline demo: tiny model + synthetic test split, tiny.TRAIN_PRESET's video settings"})
    tiny_model: str = field(default="qwen2-vl", metadata={"group": "models and data", "help": "--tiny's model family: qwen2-vl, qwen2.5-vl, qwen3-vl or qwen3.5 (made in data/tiny-<name>, as train.py --tiny_model)"})
    batch_size: int = field(default=8, metadata={"group": "generation and scoring", "help": "prompts per generation batch (per rank)"})
    max_new_tokens: int = field(default=512, metadata={"group": "generation and scoring", "help": "most new tokens per completion (--tiny: tiny.TRAIN_PRESET's max_completion_length)"})
    limit: int = field(default=0, metadata={"group": "models and data", "help": "evaluate only the first N rows of the data file (0: all); --protocol video-r1: not fewer than its output holds"})
    num_workers: int = field(default=2, metadata={"group": "video", "help": "DataLoader workers decoding videos"})
    # video: the same flags and defaults as train.Config (test_shared_flags_default_as_in_training), so eval sees what training saw
    fps: float = field(default=VideoSettings.fps, metadata={"group": "video", "help": "frames sampled per second of video"})
    min_frames: int = field(default=VideoSettings.min_frames, metadata={"group": "video", "help": "fewest frames per video"})
    max_frames: int = field(default=VideoSettings.max_frames, metadata={"group": "video", "help": "most frames per video"})
    min_pixels: int = field(default=VideoSettings.min_pixels, metadata={"group": "video", "help": "lower bound on frame area after resizing (0: 128 merged patches of the model)"})
    max_pixels: int = field(default=VideoSettings.max_pixels, metadata={"group": "video", "help": "explicit cap on frame area; 0: Video-R1's reader's rule (vision.frame_size)"})
    video_max_pixels: int = field(default=VideoSettings.video_max_pixels, metadata={"group": "video", "help": "the reader's VIDEO_MAX_PIXELS; 0: 128 merged patches; Video-R1's 32-frame evaluation: 200704 (256*28*28, docs/video-r1-recipe.md)"})
    video_time: str = field(default=VideoSettings.video_time, metadata={"group": "video", "help": "Qwen2.5-VL's seconds per temporal patch: true (2 / sampled fps, as Video-R1's eval script) or video-r1 (1.0, as its trainer)"})
    image_min_pixels: int = field(default=VideoSettings.image_min_pixels, metadata={"group": "video", "help": "image rows: lower bound on image area; 0: 4 merged patches"})
    image_max_pixels: int = field(default=VideoSettings.image_max_pixels, metadata={"group": "video", "help": "image rows: upper bound on image area; 0: 256 merged patches"})
    max_prompt_length: int = field(default=4096, metadata={"group": "video", "help": "longer prompts are skipped, never truncated"})
    compile_rollout: str = field(default="auto", metadata={"group": "generation and scoring", "help": "auto|on|off: decode with a torch.compile'd step on a static KV cache (auto: on for CUDA); same tokens"})
    protocol: str = field(default="train", metadata={"group": "generation and scoring", "help": "train: training's prompt and reward, greedy; video-r1-first: Video-R1's first eval script (its prompt, 256 new tokens, the checkpoint's repetition_penalty, its number parser); video-r1: Video-R1's eval_bench.py (docs/video-r1-recipe.md); docs/evaluation.md"})
    prompt_template: str = field(default="default", metadata={"group": "generation and scoring", "help": "--protocol train: the question's words, data.PROMPT_TEMPLATE_NAMES (video-r1: its trainer's); --protocol video-r1 always asks in its eval script's"})


# --tiny: the tiny model and the test split next to train.py --tiny's train split (tiny.TRAIN_PRESET), with its video settings
TINY = dict(model=[tiny.TRAIN_PRESET["model_name_or_path"]],
            data=os.path.join(os.path.dirname(tiny.TRAIN_PRESET["data"]), "test.jsonl"),
            max_new_tokens=tiny.TRAIN_PRESET["max_completion_length"], num_workers=tiny.TRAIN_PRESET["num_workers"],
            **{k: tiny.TRAIN_PRESET[k] for k in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels") if k in tiny.TRAIN_PRESET})


# --protocol video-r1-first, from Video-R1's first trainer's src/eval/test_qwen2vl_video_counting.py: its QUESTION_TEMPLATE (below; training's
# has two spaces and no "First"), `model.generate(**inputs, use_cache=True, max_new_tokens=256, do_sample=False)` on
# left-padded batches (the checkpoint's generation_config.json stays in force: its repetition_penalty), and
# `re.search(r'<answer>\s*(\d+)\s*</answer>', ...)` on the output and on the solution, compared as ints
VIDEO_R1_FIRST_PROMPT_TEMPLATE = ("{problem} First output the thinking process in <think> </think> and final answer (number) "
                        "in <answer> </answer> tags.")
VIDEO_R1_FIRST = dict(max_new_tokens=256)
# --protocol video-r1, from Video-R1's src/eval_bench.py: SamplingParams(temperature=0.1, top_p=0.001, max_tokens=1024)
# and LLM(max_model_len=16384); its videos take its vendored qwen-vl-utils' defaults, which are this project's (fps 2,
# 4-16 frames, 128*28*28 pixels under the reader's cap: vision.frame_size)
VIDEO_R1 = dict(max_new_tokens=1024, max_prompt_length=16384)
VIDEO_R1_SAMPLING = dict(temperature=0.1, top_p=0.001)
PROTOCOLS = ("train", "video-r1-first", "video-r1")


def video_r1_first_number(text):
    r"""Video-R1's first trainer eval script's parser: the int in the first <answer>\s*(\d+)\s*</answer> match, else None."""
    match = re.search(r"<answer>\s*(\d+)\s*</answer>", text) if isinstance(text, str) else None
    return int(match.group(1)) if match else None


def parse_config(argv=None):
    parser = runtime.dataclass_parser(Config, __doc__, model=dict(action="append", default=None), data=dict(nargs="+", default=None))
    args, _ = parser.parse_known_args(argv)
    if args.tiny:  # the preset changes defaults; flags given explicitly still win
        parser.set_defaults(**{k: v for k, v in TINY.items() if k != "model"})
    if args.protocol == "video-r1-first":  # Video-R1's first trainer's token budget, even with --tiny
        parser.set_defaults(**VIDEO_R1_FIRST)
    elif args.protocol == "video-r1":  # its token budget; --tiny: the synthetic 260k-layout test split
        parser.set_defaults(**VIDEO_R1, **({"data": os.path.join(os.path.dirname(TINY["data"]), "test_260k.json")} if args.tiny else {}))
    elif args.protocol not in PROTOCOLS:
        parser.error(f"--protocol {args.protocol!r}: choose one of {PROTOCOLS}")
    args = vars(parser.parse_args(argv))
    import tiny
    if args["tiny_model"] not in tiny.TINY_MODELS:
        parser.error(f"--tiny_model {args['tiny_model']!r}: choose one of {', '.join(tiny.TINY_MODELS)}")
    args["model"] = args["model"] or ([f"data/tiny-{args['tiny_model']}"] if args["tiny"] else [])
    args["data"] = [args["data"]] if isinstance(args["data"], str) else args["data"] or []
    if args["protocol"] == "video-r1":
        args["data"] = video_r1_files(args["data"], parser)
    elif len(args["data"]) > 1:
        parser.error(f"--data: one file (several files or a folder only with --protocol video-r1), got {args['data']}")
    else:
        args["data"] = args["data"][0] if args["data"] else ""
    if args["prompt_template"] not in data.PROMPT_TEMPLATE_NAMES:
        parser.error(f"--prompt_template {args['prompt_template']!r}: choose one of {data.PROMPT_TEMPLATE_NAMES}")
    if not args["model"] or not args["data"]:
        parser.error("give --model DIR (one or more) and --data FILE, or --tiny")
    if args["compile_rollout"] not in COMPILE_ROLLOUT:
        parser.error(f"--compile_rollout {args['compile_rollout']!r}: choose one of {COMPILE_ROLLOUT}")
    for model_dir in args["model"]:  # a folder of another family: one line, exit 2, before a tokenizer or weights load
        try:
            model_family(model_dir) if os.path.isdir(model_dir) else None
        except ModelError as e:
            parser.exit(2, f"error: {e}\n")
    return Config(**args)


# ----------------------------------------------------------------------------------------------------------------
# rows: every row of the data file, evaluated or reported

def load_rows(path, video_root=None, verbose=True):
    """
    Every row of the data file in file order: {"index", "video", "problem", "solution"} for a usable row,
    {"index", "video" (None if unknown), "reason"} for one that data.load_examples drops, so that eval takes exactly
    the rows training takes and reports the others.
    """
    skipped = []
    try:
        examples = data.load_examples(path, video_root, skipped=skipped, verbose=verbose)
    except ValueError:
        if not skipped:
            raise  # not "every row was bad" but a bad file (empty, invalid JSON list): nothing to evaluate
        examples = []
    return sorted(examples + skipped, key=lambda row: row["index"])


def key(record):
    """What identifies a row across runs: its place in the file and its video."""
    return record["index"], record["video"]


# ----------------------------------------------------------------------------------------------------------------
# scoring: the training rewards, on greedy completions

def score(output, solution, completion_length, tokenizer, protocol="train", columns=None):
    """One completion's fields: correct/format are exactly the training rewards being 1.0 (accuracy given the row's
    columns by name, as training's compute_rewards gives them: problem_type, options); with protocol "video-r1-first", answer and correct are Video-R1's first eval script's (its number parser on both
    sides, an int compare)."""
    thought = rewards.thinking_text(output)
    if protocol == "video-r1-first":
        answer = video_r1_first_number(output)
        correct = answer is not None and answer == video_r1_first_number(solution)
    else:
        answer = rewards.extract_answer(output)
        correct = rewards.compute_rewards([rewards.accuracy_reward], [1.0], [output], [solution], 1,
                                          **{k: [v] for k, v in (columns or {}).items()})[1][0].item() == 1.0
    return {"output": output, "answer": answer, "correct": correct,
            "format": rewards.format_reward([output])[0] == 1.0,
            "completion_length": int(completion_length),
            "thinking_length": 0 if thought is None else len(tokenizer(thought, add_special_tokens=False)["input_ids"])}


def summarize(model, data_path, records, protocol="train", repetition_penalty=1.0):
    """The final JSON: summary numbers computed from the records, results and skipped sorted by row index."""
    records = sorted(records, key=lambda r: r["index"])
    results = [r for r in records if "reason" not in r]
    skipped = [{"index": r["index"], "video": r["video"], "reason": r["reason"]} for r in records if "reason" in r]

    def mean(name):  # None when nothing was evaluated: 0% would claim a result
        return sum(float(r[name]) for r in results) / len(results) if results else None

    by_type = {}
    for r in results:
        by_type.setdefault(r.get("problem_type", "numerical"), []).append(float(r["correct"]))
    return {"model": model, "data": data_path, "protocol": protocol, "repetition_penalty": repetition_penalty,
            "accuracy": mean("correct"), "accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
            "format_rate": mean("format"),
            "mean_completion_length": mean("completion_length"), "mean_thinking_length": mean("thinking_length"),
            "n": len(results), "skipped": skipped, "results": results}


# ----------------------------------------------------------------------------------------------------------------
# the partial file: one line per finished row, so an interrupted run can continue

WEIGHT_FILES = (".safetensors", ".bin", ".index.json")  # HF's weight shards, their index, LoRA adapters


def weights_fingerprint(model_dir, sample=64):
    """A cheap fingerprint of the weights in model_dir, so that results are never reused for other weights: each weight
    file's name and size, each index json, each safetensors header and the first `sample` bytes of every tensor (two
    models of one shape share names, sizes and headers: two tiny models of different seeds do); a file that is no
    safetensors (a pickled .bin) adds its first and last 64 KiB. A few bytes per tensor are read, never a whole file."""
    digest = hashlib.sha256()
    names = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
    for name in [n for n in names if n.endswith(WEIGHT_FILES) and os.path.isfile(os.path.join(model_dir, n))]:
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        digest.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if name.endswith(".json"):
                digest.update(f.read())
            elif not (name.endswith(".safetensors") and sample_safetensors(f, size, sample, digest)):
                for offset in (0, max(0, size - (1 << 16))):
                    f.seek(offset)
                    digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def sample_safetensors(f, size, sample, digest):
    """Hash a safetensors file's header (8 bytes of length, then JSON) and the first `sample` bytes of each tensor into
    digest; False, hashing nothing, when the file has no readable header."""
    try:
        (length,) = struct.unpack("<Q", f.read(8))
        header = f.read(length) if 0 < length < size else b""
        tensors = json.loads(header)
    except (struct.error, ValueError):
        return False
    if not isinstance(tensors, dict):
        return False
    digest.update(header)
    for t in tensors.values():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if isinstance(offsets, list) and len(offsets) == 2:
            f.seek(8 + length + offsets[0])
            digest.update(f.read(max(0, min(sample, offsets[1] - offsets[0]))))
    return True


def partial_paths(output, rank):
    stem = os.path.splitext(output)[0]
    mine = f"{stem}.partial.jsonl" if rank == 0 else f"{stem}.partial.rank{rank}.jsonl"
    return mine, sorted(glob.glob(glob.escape(stem) + ".partial.jsonl") + glob.glob(glob.escape(stem) + ".partial.rank*.jsonl"))


class ResumeError(ValueError):
    """A results or partial file that this run must not continue (other settings, more rows than asked for): one
    `error:` line naming it, exit 2."""


def start_over_if_other_weights(paths, header):
    """Remove the partial files written for other weights than header["weights"] (the folder was retrained, or its
    weights swapped), saying so in one line: results belong to the weights they came from."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            try:
                old = json.loads(f.readline()).get("header", {}).get("weights", "none")
            except (json.JSONDecodeError, AttributeError):
                continue  # no header yet: nothing of any weights in it
        if old != header["weights"]:
            print(f"{path}: results of other weights (fingerprint {old}, {header['model']} now has "
                  f"{header['weights']}): starting over", file=sys.stderr)
            os.remove(path)


def read_partial(paths, header):
    """{(index, video): record} from the partial files. A line cut by an interruption is ignored (and redone)."""
    done = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "header" in record:
                    for k, v in header.items():
                        if record["header"].get(k) != v:
                            raise ResumeError(f"{path} was written with {k}={record['header'].get(k)!r}, this run has "
                                             f"{k}={v!r}; delete it or choose another --output")
                else:
                    done[key(record)] = record
    return done


def read_done(output, header, rank=0, world=1):
    """The rows already in output's partial files (every rank's), once rank 0 has removed those of other weights."""
    if rank == 0:
        start_over_if_other_weights(partial_paths(output, rank)[1], header)
    if world > 1:
        torch.distributed.barrier()  # no rank reads a partial file of other weights
    return read_partial(partial_paths(output, rank)[1], header)


def open_partial(path, header):
    f = open(path, "a", encoding="utf-8")
    if f.tell() == 0:
        f.write(json.dumps({"header": header}) + "\n")
    else:
        with open(path, "rb") as g:
            g.seek(-1, os.SEEK_END)
            if g.read(1) != b"\n":
                f.write("\n")  # the last line was cut mid-write: start on a fresh one
    f.flush()
    return f


# ----------------------------------------------------------------------------------------------------------------
# one model

def partial_header(cfg, model_dir):
    """What a partial file must have been written with for a run to continue it: the model (its path and its weights'
    fingerprint), the data and every setting that changes an output."""
    # Video-R1's first trainer's script left the checkpoint's generation_config.json in force; training's rollout never reads it
    penalty = generation_repetition_penalty(model_dir) if cfg.protocol == "video-r1-first" else 1.0
    return {"model": os.path.abspath(model_dir), "data": os.path.abspath(cfg.data), "video_root": cfg.video_root,
            "protocol": cfg.protocol, "repetition_penalty": penalty, "max_new_tokens": cfg.max_new_tokens,
            "max_prompt_length": cfg.max_prompt_length,
            **{k: getattr(cfg, k) for k in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels")},
            **{k: getattr(cfg, k) for k in data.SETTING_FLAGS[5:] if getattr(cfg, k) != getattr(Config, k)},
            **({"prompt_template": cfg.prompt_template} if cfg.prompt_template != "default" else {}),
            "weights": weights_fingerprint(model_dir)}


def evaluate(cfg, model_name, rows, output, *, rank=0, world=1, device=torch.device("cpu")):
    """Evaluate one model on rows (from load_rows), rank's share r::world; rank 0 merges and writes output.
    Returns the summary dict on rank 0, None on the others."""
    from transformers import AutoTokenizer
    from tqdm import tqdm

    model_dir = resolve_model_dir(model_name, flag="--model")
    header = partial_header(cfg, model_dir)
    penalty = header["repetition_penalty"]
    my_partial = partial_paths(output, rank)[0]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    done = read_done(output, header, rank, world)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = data.video_settings_from_pretrained(model_dir, **{k: getattr(cfg, k) for k in data.SETTING_FLAGS})
    mine = [r for r in rows if "reason" not in r][rank::world]
    new_records = [r for r in rows if "reason" in r and key(r) not in done] if rank == 0 else []  # rows bad at load
    # fixed slices of this rank's rows; a slice is re-run whole if any of its rows is missing (same padding as before)
    batches = [list(range(i, min(i + cfg.batch_size, len(mine)))) for i in range(0, len(mine), cfg.batch_size)]
    batches = [b for b in batches if any(key(mine[j]) not in done for j in b)]
    todo = sum(key(mine[j]) not in done for b in batches for j in b)
    print(f"[rank {rank}] {model_name}: {len(mine)} examples, {len(mine) - todo} already in {my_partial}, {todo} to go",
          file=sys.stderr, flush=True)

    with open_partial(my_partial, header) as partial:
        def write(records):
            for r in records:
                partial.write(json.dumps(r) + "\n")
            partial.flush()
        write(new_records)
        if batches:
            model = load_model(model_dir, bf16=torch.cuda.is_available(), device=device).to(device).eval()
            # EOS and suppressed tokens exactly as train.setup() builds them (model.special_token_ids)
            eos_token_ids, suppress = special_token_ids(tokenizer, model.config.text_config.vocab_size)
            dataset = data.VideoPromptDataset(mine, tokenizer, settings, max_prompt_length=cfg.max_prompt_length,  # every column
                                              template=VIDEO_R1_FIRST_PROMPT_TEMPLATE if cfg.protocol == "video-r1-first" else None,
                                              prompt_template=cfg.prompt_template if cfg.protocol == "train" else "default")
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                                 collate_fn=functools.partial(data.collate, pad_token_id=tokenizer.pad_token_id))
            bar = tqdm(total=todo, unit="ex", desc=os.path.basename(os.path.normpath(model_name)), disable=rank != 0, file=sys.stderr)
            for batch in loader:
                records = [{"index": mine[it["index"]]["index"], "video": it["video"], "reason": it["error"]}
                           for it in batch["skipped"]]
                if batch["solution"]:
                    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    completion_ids = sample_completions(
                        model, inputs, num_generations=1, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                        eos_token_ids=eos_token_ids, suppress_token_ids=suppress, pad_token_id=tokenizer.pad_token_id,
                        greedy=True, repetition_penalty=penalty, decode=rollout_decode(cfg.compile_rollout, device)).cpu()  # (B, C)
                    mask = completion_mask(completion_ids, eos_token_ids)              # (B, C)
                    outputs = decode_completions(tokenizer, completion_ids, mask)
                    for b, out in enumerate(outputs):
                        row = mine[batch["index"][b]]
                        records.append({"index": row["index"], "video": row["video"], "problem": row["problem"],
                                        "problem_type": row["problem_type"], "solution": row["solution"],
                                        **score(out, row["solution"], mask[b].sum(), tokenizer, cfg.protocol,
                                                {k: v[b] for k, v in batch["columns"].items()})})
                records = [r for r in records if key(r) not in done]  # rows of a re-run half-done batch are kept as first written
                write(records)
                bar.update(len(records))
            bar.close()

    if world > 1:
        torch.distributed.barrier()  # every rank's partial file is complete
    if rank != 0:
        return None
    done = read_partial(partial_paths(output, rank)[1], header)
    missing = [r["index"] for r in rows if key(r) not in done]
    if missing:
        raise RuntimeError(f"{output}: no result for rows {missing[:10]}{'...' if len(missing) > 10 else ''} in the partial files")
    summary = summarize(model_name, cfg.data, [done[key(r)] for r in rows], cfg.protocol, penalty)
    tmp = f"{output}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, output)  # a reader never sees half a file
    print(f"wrote {output}", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# reporting and the command line

def format_table(summaries):
    """Models side by side: one column per model, one line per metric, then the skipped rows and why (summarised)."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    def num(x):
        return "n/a" if x is None else f"{x:.1f}"

    types = sorted({t for s in summaries for t in s.get("accuracy_by_type", {})})
    lines = [("model", [s["model"] for s in summaries]),
             ("protocol", [f"{s.get('protocol', 'train')} (penalty {s.get('repetition_penalty', 1.0):g})" for s in summaries]),
             ("accuracy (%)", [pct(s["accuracy"]) for s in summaries]),
             *[(f"  {t} (%)", [pct(s.get("accuracy_by_type", {}).get(t)) for s in summaries]) for t in types],
             ("format rate (%)", [pct(s["format_rate"]) for s in summaries]),
             ("mean completion length (tokens)", [num(s["mean_completion_length"]) for s in summaries]),
             ("mean thinking length (tokens)", [num(s["mean_thinking_length"]) for s in summaries]),
             ("examples evaluated", [str(s["n"]) for s in summaries]),
             ("examples skipped", [str(len(s["skipped"])) for s in summaries])]
    width = max(len(name) for name, _ in lines)
    cols = [max(len(values[i]) for _, values in lines) for i in range(len(summaries))]
    out = [f"{name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cols)) for name, values in lines]
    for s in summaries:  # the first 3 of each reason, then counts (data.SkipSummary): not one line per row
        skips = data.SkipSummary(prefix=f"skipped ({s['model']}): ")
        for sk in s["skipped"]:
            skips.add(f"row {sk['index']}", sk["reason"], sk.get("video"))
        out += skips.lines("")
    return "\n".join(out)


def make_tiny_inputs(cfg, rank=0, world=1):
    """Check every --model (model.check_model_path: a missing folder raises ModelError, before anything is made), then
    under --tiny make on first use, on rank 0 while the others wait, the tiny model at its own folder (data/tiny-<name>)
    and the synthetic split in its own folder. Any other --model or --data is used as given: a mistyped path is an
    error, never a fresh random model or data set."""
    families = [check_model_path(m, flag="--model", tiny=cfg.tiny) for m in cfg.model]
    if cfg.tiny and rank == 0:
        for m, family in zip(cfg.model, families):
            if family:
                tiny.save_tiny_model(m, family=family)
        synthetic = os.path.dirname(TINY["data"])
        if any(not os.path.exists(d) and os.path.dirname(os.path.normpath(d)) == synthetic
               for d in (cfg.data if isinstance(cfg.data, list) else [cfg.data])):
            datatools.make_synthetic_dataset(synthetic)
    if cfg.tiny and world > 1:
        torch.distributed.barrier()


def check_json_text(path):
    """--data is a JSON list or JSON Lines: text that starts with `[` (load_examples reports a broken list) or of which
    some line is JSON (load_examples skips the others, with reasons). Anything else (a CSV, a pretty-printed object,
    binary) raises ValueError naming the file, where load_examples would skip every line and report nothing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSON Lines or a JSON list") from e
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or text.lstrip().startswith("["):
        return
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            json.loads(line)
            return  # some line is JSON: load_examples reports the rest
    raise ValueError(f"--data {path}: neither a JSON list nor JSON Lines (no line of it is JSON); the layouts: docs/data.md")


def output_paths(cfg):
    """--output for one model; else one file per model in the --output folder (default results/<model>-<data>.json)."""
    if cfg.output and len(cfg.model) == 1:
        return [cfg.output]
    folder = cfg.output or "results"
    suffix = "" if cfg.output else "-" + Path(cfg.data).stem
    paths = [os.path.join(folder, m.strip("/").replace("/", "_") + suffix + ".json") for m in cfg.model]
    assert len(set(paths)) == len(paths), f"--model given twice: {cfg.model}"
    return paths


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = parse_config(argv)
    rank, world, device = runtime.init_distributed(use_deepspeed=False)
    if cfg.protocol == "video-r1":
        return main_video_r1(cfg, world, device)
    try:  # a missing model folder or data file, or a data file with no row: one line, exit 2 (as train.py)
        make_tiny_inputs(cfg, rank, world)
        for name in cfg.model:
            resolve_model_dir(name, flag="--model")
        if not os.path.isfile(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data}: no such file")
        check_json_text(cfg.data)
        rows = load_rows(cfg.data, cfg.video_root or None, verbose=rank == 0)
    except (ModelError, ValueError, FileNotFoundError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rows = rows[:cfg.limit] if cfg.limit > 0 else rows
    t0 = time.time()
    try:
        summaries = [evaluate(cfg, m, rows, out, rank=rank, world=world, device=device)
                     for m, out in zip(cfg.model, output_paths(cfg))]
    except ResumeError as e:  # a partial file of other settings: one line, exit 2
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if rank == 0:
        print(format_table(summaries))
        print(f"{len(rows)} rows, {len(cfg.model)} model(s), {world} rank(s), {time.time() - t0:.1f}s")
    if world > 1:
        torch.distributed.barrier()  # ranks leave together, no collective in flight when the group closes (train.main)
        torch.distributed.destroy_process_group()
    return summaries


# ----------------------------------------------------------------------------------------------------------------
# --protocol video-r1: Video-R1's src/eval_bench.py, one output file per benchmark in its layout

def video_r1_files(paths, parser=None):
    """--data under --protocol video-r1: files as given, a folder as its *.json files in name order."""
    files = []
    for p in paths:
        found = sorted(glob.glob(os.path.join(glob.escape(p), "*.json"))) if os.path.isdir(p) else [p]
        if not found and parser is not None:
            parser.error(f"--data {p}: a folder without *.json files")
        files += found
    return files


def benchmark_name(data_path):
    """eval_mvbench.json -> mvbench, as eval_bench.py names its benchmarks."""
    return Path(data_path).stem.removeprefix("eval_")


def video_r1_output_paths(cfg):
    """[[output file per data file] per model]: <folder>/<data stem>_output.json; the folder is --output with one model,
    else <--output or results/video-r1>/<model path with / as _>."""
    def folder(m):
        return cfg.output if cfg.output and len(cfg.model) == 1 else \
            os.path.join(cfg.output or os.path.join("results", "video-r1"), m.strip("/").replace("/", "_"))
    return [[os.path.join(folder(m), Path(d).stem + "_output.json") for d in cfg.data] for m in cfg.model]


def video_r1_think(output):
    r"""eval_bench.py's extract_think: the stripped group of the first <think>\s*(.*?)\s*</think> (DOTALL), else ""."""
    match = re.search(r"<think>\s*(.*?)\s*</think>", output, re.DOTALL)
    return match.group(1).strip() if match else ""


def video_r1_row(raw, output, error=None):
    """One `results` row as eval_bench.py writes it: the data row, then output, prediction, reward, correct and (when
    the output has a thought) process; a row whose video could not be read gets its "<answer>error</answer>" output
    (reward 0.0, counted in mean_acc as it counts it) and the reason under "error"."""
    row = dict(raw)
    row["output"] = output
    row["prediction"] = rewards.video_r1_prediction(output)
    row["reward"] = rewards.video_r1_eval_reward(output, row.get("solution", ""), row.get("problem_type", ""))
    row["correct"] = row["reward"] == 1.0
    if video_r1_think(output):
        row["process"] = f"<think>{video_r1_think(output)}</think>"
    if error is not None:
        row["error"] = error
    return row


def video_r1_final_acc(results):
    """eval_bench.py's final_acc: mean_acc over the non-regression rows, mean_mra over the regression rows (0.0 when
    none), as float32 torch means. It averaged only the rows scored since the last restart; here every row. mean_acc of
    no row: None (its torch mean of nothing was NaN)."""
    acc = [r["reward"] for r in results if r.get("problem_type") != "regression"]
    mra = [r["reward"] for r in results if r.get("problem_type") == "regression"]
    return {"mean_acc": torch.tensor(acc).mean().item() if acc else None,
            "mean_mra": torch.tensor(mra).mean().item() if mra else 0.0}


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file whole


def read_video_r1_rows(path):
    """A benchmark file's rows: a JSON list of objects (Video-R1's eval layout), else ValueError naming --data."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file")
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = json.loads(text) if text.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--data {path}: not valid JSON ({e}); expected a JSON list of rows (Video-R1's eval layout)") from e
    if raw is None:
        raise ValueError(f"--data {path}: empty file; expected a JSON list of rows (Video-R1's eval layout)")
    if not isinstance(raw, list):
        raise ValueError(f"--data {path}: expected a JSON list of rows (Video-R1's eval layout), got {type(raw).__name__}")
    for i, row in enumerate(raw):
        if not isinstance(row, dict):
            raise ValueError(f"--data {path}: row {i + 1} is a {type(row).__name__}, not an object")
    return raw


def read_video_r1_output(output, settings, raw, data_path, limit):
    """The finished rows in a previous run's output file, to continue after (as eval_bench.py does). An output of other
    weights starts over (one line says why); one of other settings, whose rows are not this file's, or that holds more
    finished rows than this run asks for (a rerun never drops them: --limit below what is done) raises ResumeError."""
    if not os.path.exists(output):
        return []
    try:
        with open(output, encoding="utf-8") as f:
            previous = json.load(f)
        results, old = previous["results"], previous.get("settings") or {}
        if not isinstance(results, list) or not isinstance(old, dict):
            raise TypeError("results or settings of another shape")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ResumeError(f"{output}: not an output file of this protocol ({type(e).__name__}); delete it or choose "
                          f"another --output") from e
    if old.get("weights") != settings["weights"]:
        print(f"{output}: results of other weights (fingerprint {old.get('weights', 'none')}, {settings['model']} now "
              f"has {settings['weights']}): starting over", file=sys.stderr)
        return []
    changed = sorted(k for k in {**old, **settings} if k != "limit" and old.get(k) != settings.get(k))
    if changed:
        raise ResumeError(f"{output}: written with " + ", ".join(f"{k}={old.get(k)!r}" for k in changed) + ", this run has "
                          + ", ".join(f"{k}={settings.get(k)!r}" for k in changed) + "; delete it or choose another --output")
    if len(results) > len(raw):
        raise ResumeError(f"{output}: {len(results)} finished rows, more than " + (
            f"--limit {limit} asks for; a rerun never drops finished rows: give --limit {len(results)} or more (0: all), "
            f"or choose another --output" if limit > 0 else f"{data_path} has; delete it or choose another --output"))
    for i, r in enumerate(results):
        if not isinstance(r, dict) or (r.get("path"), r.get("problem")) != (raw[i].get("path"), raw[i].get("problem")):
            raise ResumeError(f"{output}: result {i + 1} is not row {i + 1} of {data_path}; delete it or choose another --output")
    return results


def plan_video_r1(cfg, data_path, output, model_dir, weights):
    """Everything about one benchmark file that can be wrong, read before any model loads: its rows (raw, after
    --limit), the examples data.load_examples takes and the reasons it gives for the others, the settings the output
    records, and the rows already finished there. Bad input raises ValueError naming the file or flag."""
    raw = read_video_r1_rows(data_path)
    raw = raw[:cfg.limit] if cfg.limit > 0 else raw
    bad = []
    try:
        examples = data.load_examples(data_path, cfg.video_root or None, skipped=bad, verbose=False)
    except ValueError:
        if not bad:
            raise
        examples = []
    settings = {"model": os.path.abspath(model_dir), "data": os.path.abspath(data_path), "protocol": "video-r1",
                "max_new_tokens": cfg.max_new_tokens, "max_prompt_length": cfg.max_prompt_length, **VIDEO_R1_SAMPLING,
                **{k: getattr(cfg, k) for k in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels")},
                **{k: getattr(cfg, k) for k in data.SETTING_FLAGS[5:] if getattr(cfg, k) != getattr(Config, k)},
                "limit": cfg.limit, "weights": weights}
    return {"data": data_path, "output": output, "raw": raw, "by_index": {e["index"]: e for e in examples},
            "reasons": {b["index"]: b["reason"] for b in bad}, "settings": settings,
            "results": read_video_r1_output(output, settings, raw, data_path, cfg.limit)}


def evaluate_video_r1(cfg, plan, ctx):
    """One benchmark file (plan_video_r1), as eval_bench.py: rows in file order, in batches of --batch_size; after each
    batch the output file is rewritten with every row so far, and a re-run continues after the rows found there.
    ctx: {"model_dir", "tokenizer", "settings", "device", "model" (loaded on first need)}.
    Returns {"benchmark", "data", "output", "n", "errors", "by_type", "final_acc"}."""
    from tqdm import tqdm

    data_path, output, raw, results, settings = (plan[k] for k in ("data", "output", "raw", "results", "settings"))
    by_index, reasons = plan["by_index"], plan["reasons"]
    start, name = len(results), benchmark_name(data_path)
    print(f"{name}: {len(raw)} rows, {start} already in {output}, {len(raw) - start} to go", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if start < len(raw):
        tokenizer, device = ctx["tokenizer"], ctx["device"]
        if ctx.get("model") is None:
            ctx["model"] = load_model(ctx["model_dir"], bf16=torch.cuda.is_available(), device=device).to(device).eval()
        model = ctx["model"]
        eos_token_ids, suppress = special_token_ids(tokenizer, model.config.text_config.vocab_size)
        # a row that data.load_examples refused gets a video that cannot be read: an error item with the others
        unusable = {"video": "", "problem": "", "solution": "", "problem_type": "numerical", "options": []}
        dataset = data.VideoPromptDataset([by_index.get(i + 1, unusable) for i in range(len(raw))], tokenizer,
                                          ctx["settings"], max_prompt_length=cfg.max_prompt_length, prompt_template="video-r1-eval")
        batches = [list(range(i, min(i + cfg.batch_size, len(raw)))) for i in range(start, len(raw), cfg.batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                             collate_fn=functools.partial(data.collate, pad_token_id=tokenizer.pad_token_id))
        bar = tqdm(total=len(raw), initial=start, unit="ex", desc=name, file=sys.stderr)
        for rows, batch in zip(batches, loader):
            outputs = {it["index"]: (OUTPUT_ON_ERROR, reasons.get(it["index"] + 1, it["error"])) for it in batch["skipped"]}
            if batch["solution"]:
                torch.manual_seed(rows[0])  # a batch samples the same whether the run was resumed or not
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                completion_ids = sample_completions(
                    model, inputs, num_generations=1, max_new_tokens=cfg.max_new_tokens, eos_token_ids=eos_token_ids,
                    suppress_token_ids=suppress, pad_token_id=tokenizer.pad_token_id,
                    decode=rollout_decode(cfg.compile_rollout, device), **VIDEO_R1_SAMPLING).cpu()   # (B, C)
                mask = completion_mask(completion_ids, eos_token_ids)                             # (B, C)
                for i, text in zip(batch["index"], decode_completions(tokenizer, completion_ids, mask)):
                    outputs[i] = (text, None)
            results += [video_r1_row(raw[i], *outputs[i]) for i in rows]
            write_json(output, {"results": results, "settings": settings})
            bar.update(len(rows))
        bar.close()
    final_acc = video_r1_final_acc(results)
    write_json(output, {"results": results, "final_acc": [final_acc], "settings": settings})
    by_type = {}
    for r in results:
        by_type.setdefault(r.get("problem_type", ""), []).append(r["reward"])
    return {"benchmark": name, "data": data_path, "output": output, "n": len(results),
            "errors": [{"row": i + 1, "reason": r["error"]} for i, r in enumerate(results) if "error" in r],
            "by_type": {t: (len(v), sum(v) / len(v)) for t, v in sorted(by_type.items())}, "final_acc": final_acc}


# eval_bench.py's output for a batch it could not read (there: the whole batch of 64; here: the row)
OUTPUT_ON_ERROR = "<answer>error</answer>"


def format_video_r1_tables(models, summaries):
    """One table per benchmark (rows by problem type: count and mean reward, then mean_acc and mean_mra, in percent;
    a column per model) and a summary table (a line per benchmark, a column per model: mean_acc / mean_mra)."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    def table(title, lines):
        width = max(len(name) for name, _ in lines)
        cols = [max(len(v[i]) for _, v in lines) for i in range(len(models))]
        return [title] + [f"  {name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cols)) for name, values in lines]

    out = []
    for b in range(len(summaries[0])):
        per_model = [s[b] for s in summaries]
        types = sorted({t for s in per_model for t in s["by_type"]})
        lines = [("model", list(models)),
                 *[(f"{t} (n, mean reward %)", [f"{s['by_type'][t][0]}, {pct(s['by_type'][t][1])}" if t in s["by_type"] else "-"
                                                for s in per_model]) for t in types],
                 ("mean_acc (%)", [pct(s["final_acc"]["mean_acc"]) for s in per_model]),
                 ("mean_mra (%)", [pct(s["final_acc"]["mean_mra"]) for s in per_model]),
                 ("rows", [str(s["n"]) for s in per_model]),
                 ("rows not read (scored 0)", [str(len(s["errors"])) for s in per_model])]
        out += table(f"{per_model[0]['benchmark']} ({per_model[0]['data']})", lines)
        for m, s in zip(models, per_model):
            skips = data.SkipSummary(prefix=f"  not read ({m}): ")  # the first 3 of each reason, then counts
            for e in s["errors"]:
                skips.add(f"row {e['row']}", e["reason"])
            out += skips.lines("")
    lines = [("benchmark", [f"{m} mean_acc / mean_mra" for m in models])]
    lines += [(s[0]["benchmark"], [f"{pct(x[b]['final_acc']['mean_acc'])} / {pct(x[b]['final_acc']['mean_mra'])}"
                                   for x in summaries]) for b, s in enumerate(zip(*summaries))]
    return "\n".join(out + table("summary (%)", lines))


def main_video_r1(cfg, world, device):
    """--protocol video-r1: every model on every benchmark file, then the tables. One process (its script: one vLLM
    engine); outputs per model per benchmark (video_r1_output_paths). Every model and file is checked before any
    decoding: bad input is one `error:` line, exit 2."""
    from transformers import AutoTokenizer
    try:
        if world > 1:
            raise ValueError("--protocol video-r1 runs in one process (python eval.py, not torchrun)")
        make_tiny_inputs(cfg)
        model_dirs = [resolve_model_dir(m, flag="--model") for m in cfg.model]
        plans = [[plan_video_r1(cfg, d, out, model_dir, weights_fingerprint(model_dir)) for d, out in zip(cfg.data, outputs)]
                 for model_dir, outputs in zip(model_dirs, video_r1_output_paths(cfg))]
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    t0, summaries = time.time(), []
    for model_dir, model_plans in zip(model_dirs, plans):
        ctx = {"model_dir": model_dir, "tokenizer": AutoTokenizer.from_pretrained(model_dir), "device": device,
               "settings": data.video_settings_from_pretrained(model_dir, **{k: getattr(cfg, k) for k in data.SETTING_FLAGS})}
        summaries.append([evaluate_video_r1(cfg, plan, ctx) for plan in model_plans])
        for s in summaries[-1]:
            print(f"wrote {s['output']}", file=sys.stderr)
    print(format_video_r1_tables(cfg.model, summaries))
    print(f"{len(cfg.data)} benchmark(s), {len(cfg.model)} model(s), {time.time() - t0:.1f}s")
    return summaries


if __name__ == "__main__":
    main()
