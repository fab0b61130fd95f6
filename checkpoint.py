"""
What a run writes: the HF model folders (save_model), the training state for exact resume that it saves every
--save_steps and reads back with --resume_from, and metrics.jsonl (MetricsLogger).

    OUTPUT_DIR/checkpoint-<step>/            an HF model folder (weights, tokenizer, preprocessor config), kept;
                                             with LoRA the adapter in peft's format instead of the weights
    OUTPUT_DIR/final/                        the same; with LoRA the merged HF model, its adapter in final/adapter/
    OUTPUT_DIR/checkpoint-<step>/training_state/
        deepspeed/                           the DeepSpeed engine checkpoint: ZeRO shards, optimizer, LR scheduler
        rank<r>.pt                           rank r's position in its data order and its python/numpy/torch RNG states
        trainer_state.json                   {"step": ...}, written last (whole or not at all): a checkpoint without it
                                             is incomplete, and `--resume_from latest` passes over it
    OUTPUT_DIR/run_config.json               the resolved config; "finished_step" once final/ is written (then the run
                                             is not resumed: train further from final/ in a new run)

A save whose writes fail (disk full, quota) stops the run with one line naming the folder (SaveError); the folder
stays incomplete and nothing older was deleted yet: rotation comes after the new checkpoint is complete. A folder
written again (a resumed run reaching a step the abandoned run had saved) loses its marker before anything is written.
A resumed run deletes, at its first save, the checkpoint folders of the run it left behind that are newer than the
one it writes (it would write over them when it got there), so `--resume_from latest` is always the newest save.
Only the newest --save_total_limit training states are kept (they hold the optimizer: ~12 bytes per parameter);
the HF model files of only the newest --save_model_limit checkpoint folders (0: all). At 7B a training state is
~100 GB (fp32 master weights and two Adam moments, in ZeRO shards), a model folder 16.6 GB (bf16).
"""
import contextlib
import dataclasses
import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors import SafetensorError

from runtime import ConfigError

STATE = "training_state"
# what a run writes in its output_dir besides its checkpoint-<step> folders: what --overwrite_output_dir removes
RUN_FILES = ("final", "metrics.jsonl", "samples.jsonl", "curves.png", "run_config.json", "run_config.json.tmp", "tb", "wandb")


class SaveError(RuntimeError):
    """A checkpoint or final/ that could not be written (disk full, quota): one line naming the folder, exit code 1."""


@contextlib.contextmanager
def writing(folder, rank):
    """Around every write of one checkpoint-<step> or final/ folder (a collective: all ranks enter). Rank 0 first
    removes the folder's completeness marker, so a folder written again that fails half-way is not a mix of old and new
    files that `latest` would pick; an error of any writer (OSError from open, RuntimeError from torch.save,
    SafetensorError from the HF weights) becomes a SaveError naming the folder."""
    if rank == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, STATE, "trainer_state.json"))
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # torch's messages can span lines
        raise SaveError(f"saving {folder} failed: {reason}. It is incomplete: --resume_from latest takes the newest "
                        f"complete checkpoint, which this save did not touch") from e


def write_json(path, obj):
    """Whole or not at all: a full disk leaves path.tmp, never a truncated path."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save_model(engine, tokenizer, model_dir, out_dir, rank, merge_lora=False):
    """An HF model folder (16-bit weights gathered under ZeRO-3) + tokenizer + preprocessor config. A LoRA policy (peft)
    saves its adapter (peft's format); with merge_lora, out_dir gets the merged HF model and the adapter out_dir/adapter."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else engine.module.state_dict()
    if rank == 0:
        module = engine.module
        if hasattr(module, "peft_config"):
            module.save_pretrained(os.path.join(out_dir, "adapter") if merge_lora else out_dir, state_dict=state_dict)
            if merge_lora:
                lora = module.peft_config["default"]
                module.get_base_model().save_pretrained(out_dir, state_dict=merged_lora_state_dict(state_dict, lora.lora_alpha / lora.r))
        else:
            module.save_pretrained(out_dir, state_dict=state_dict)
        tokenizer.save_pretrained(out_dir)
        for name in ("preprocessor_config.json", "chat_template.json", "video_preprocessor_config.json"):
            if os.path.exists(os.path.join(model_dir, name)):
                shutil.copy(os.path.join(model_dir, name), out_dir)


def merged_lora_state_dict(state_dict, scaling):
    """A peft LoRA model's state dict -> the plain HF model's, each adapted weight W replaced by W + scaling * B @ A
    (computed in float32, stored in W's dtype)."""
    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            module = key[:-len(".base_layer.weight")]
            A, B = state_dict[f"{module}.lora_A.default.weight"], state_dict[f"{module}.lora_B.default.weight"]  # (r, in), (out, r)
            value = (value.float() + scaling * (B.float() @ A.float())).to(value.dtype)  # (out, in)
        merged[name] = value
    return merged


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, checkpoint_dir, step, position, rank, save_total_limit, save_model_limit=0):
    """Collective: every rank writes its ZeRO shards and its own position and RNG; rank 0 marks it complete."""
    state_dir = os.path.join(checkpoint_dir, STATE)
    engine.save_checkpoint(state_dir, tag="deepspeed")
    torch.save({"position": position, "rng": rng_state()}, os.path.join(state_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        write_json(os.path.join(state_dir, "trainer_state.json"), {"step": step, "world_size": torch.distributed.get_world_size()})
        output_dir = os.path.dirname(checkpoint_dir)
        # a run saves in step order, so a newer checkpoint-<t> is the abandoned run's this one was resumed past: it
        # goes (it would be written over at step t, as HF Trainer and DeepSpeed do), so `latest` is the one just written
        for t, path in checkpoint_folders(output_dir):
            if t > step:
                shutil.rmtree(path, ignore_errors=True)
        assert save_total_limit >= 1, "keep at least the newest training state (train.py refuses --save_total_limit 0)"
        for old in complete_checkpoints(output_dir)[:-save_total_limit]:
            if os.path.abspath(old) != os.path.abspath(checkpoint_dir):  # never the checkpoint just written
                shutil.rmtree(os.path.join(old, STATE), ignore_errors=True)
        rotate_models(output_dir, save_model_limit)
    torch.distributed.barrier()


def rotate_models(output_dir, keep):
    """Delete the HF model files of all but the newest `keep` checkpoint-<step> folders (0: keep all). A training
    state inside stays (a resume reads only that); a folder left empty goes."""
    if keep <= 0:
        return
    for _, path in checkpoint_folders(output_dir)[:-keep]:
        for name in os.listdir(path):
            if name != STATE:
                target = os.path.join(path, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        if not os.listdir(path):
            os.rmdir(path)


def checkpoint_folders(output_dir):
    """(step, path) of every checkpoint-<step> folder, complete or not, oldest first."""
    return sorted((int(m.group(1)), path) for path in glob.glob(os.path.join(output_dir, "checkpoint-*"))
                  if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))))


def complete_checkpoints(output_dir):
    """checkpoint-<step> folders with a complete training state, oldest first."""
    return [path for _, path in checkpoint_folders(output_dir) if os.path.exists(os.path.join(path, STATE, "trainer_state.json"))]


def find(output_dir, resume_from, world=None):
    """The checkpoint folder that --resume_from names ('latest': the newest complete one in output_dir). With `world`,
    a checkpoint saved by another number of ranks is refused (ValueError): ZeRO-3 keeps each rank's slice of the
    weights and optimizer in that rank's files, which DeepSpeed does not re-split (only after its separate
    universal-checkpoint conversion), and each rank's RNG stream cannot be restored on another layout."""
    if resume_from == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from latest: no complete checkpoint in {output_dir}")
        resume_from = found[-1]
    elif not os.path.exists(os.path.join(resume_from, STATE, "trainer_state.json")):
        raise FileNotFoundError(f"--resume_from {resume_from}: no {STATE}/trainer_state.json there (incomplete, "
                                f"rotated away by --save_total_limit, or not a checkpoint folder)")
    if world is not None:
        with open(os.path.join(resume_from, STATE, "trainer_state.json")) as f:
            saved = json.load(f)["world_size"]
        if saved != world:
            raise ValueError(f"--resume_from {resume_from}: saved by {saved} ranks, this run has {world}; ZeRO-3's "
                             f"optimizer shards and each rank's RNG belong to one rank count: resume with {saved} "
                             f"ranks, or start a new run from its weights with --model_name_or_path {resume_from}")
    return resume_from


def finished_step(output_dir):
    """The last step of the run in output_dir if it finished (final/ written), else None."""
    try:
        with open(os.path.join(output_dir, "run_config.json")) as f:
            return json.load(f).get("finished_step")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def mark_finished(output_dir, step):
    """Rank 0, after final/ is written: the run is finished and --resume_from refuses it from now on."""
    path = os.path.join(output_dir, "run_config.json")
    with open(path) as f:
        run_config = json.load(f)
    write_json(path, {**run_config, "finished_step": step})


def check_output_dir(cfg):
    """validate_config's checks of --output_dir against --resume_from, --overwrite_output_dir and the model path."""
    out = os.path.abspath(cfg.output_dir)
    inside = lambda path: os.path.abspath(path) == out or os.path.abspath(path).startswith(out + os.sep)
    if cfg.overwrite_output_dir and (cfg.resume_from == "latest" or (cfg.resume_from and inside(cfg.resume_from))):
        raise ConfigError(f"--overwrite_output_dir deletes the run in {cfg.output_dir} that --resume_from "
                          f"{cfg.resume_from} would continue: give one of them")
    if cfg.overwrite_output_dir and os.path.exists(cfg.model_name_or_path) and inside(cfg.model_name_or_path):
        raise ConfigError(f"--overwrite_output_dir would delete --model_name_or_path {cfg.model_name_or_path} before "
                          f"the new run saves anything: train from it into another --output_dir")
    finished = finished_step(cfg.output_dir)
    if finished is not None and not cfg.overwrite_output_dir:  # extending it would redo the steps after its last checkpoint
        flag = f"--resume_from {cfg.resume_from}: the run" if cfg.resume_from else "--output_dir: the run"
        raise ConfigError(f"{flag} in {cfg.output_dir} finished at step {finished} (final/ written) and is not "
                          f"extended; to train further from its weights start a new run: --model_name_or_path "
                          f"{os.path.join(cfg.output_dir, 'final')} with another --output_dir (a fresh optimizer and "
                          f"learning-rate schedule), or start over with --overwrite_output_dir")
    ran_here = any(os.path.exists(os.path.join(cfg.output_dir, f)) for f in ("metrics.jsonl", "run_config.json"))
    if ran_here and not cfg.resume_from and not cfg.overwrite_output_dir:
        raise ConfigError(f"--output_dir {cfg.output_dir} holds a run already: continue it with --resume_from latest, "
                          f"start over with --overwrite_output_dir, or choose another --output_dir")


def clear_run(output_dir, rank):
    """--overwrite_output_dir, before the new run writes anything: rank 0 deletes what a run writes in output_dir
    (checkpoint-<step> folders, RUN_FILES) and says so in one line; other files stay. The other ranks wait."""
    if rank == 0:
        names = [os.path.basename(path) for _, path in checkpoint_folders(output_dir)]
        names += [name for name in RUN_FILES if os.path.lexists(os.path.join(output_dir, name))]
        for name in names:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        if names:
            print(f"--overwrite_output_dir: removed from {output_dir}: {', '.join(names)}", flush=True)
    torch.distributed.barrier()


def start_run(cfg, rank, start_step, run_config):
    """The run's folder before its first step: an --overwrite_output_dir run's old files gone; metrics.jsonl and
    samples.jsonl cut back to the resumed step (rows a killed run logged after its checkpoint are logged again) or
    started empty; run_config.json = run_config (the flags and what was derived from them)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.overwrite_output_dir:  # the old run goes before the new one writes: nothing of it is left to resume
        clear_run(cfg.output_dir, rank)
    if rank == 0:
        for name in ("metrics.jsonl", "samples.jsonl"):
            if start_step:
                truncate_jsonl(os.path.join(cfg.output_dir, name), start_step)
            else:
                open(os.path.join(cfg.output_dir, name), "w").close()
        with open(os.path.join(cfg.output_dir, "run_config.json"), "w") as f:
            json.dump(run_config, f, indent=2)


def load(engine, checkpoint_dir, rank):
    """Restore the engine (weights, optimizer, scheduler); return (step, this rank's position, its RNG states)."""
    state_dir = os.path.join(checkpoint_dir, STATE)
    with open(os.path.join(state_dir, "trainer_state.json")) as f:
        meta = json.load(f)
    world = torch.distributed.get_world_size()
    if meta["world_size"] != world:
        raise ValueError(f"{checkpoint_dir} was saved by {meta['world_size']} ranks, this run has {world}: "
                         f"each rank's data position and RNG are in the checkpoint, so resume with the same count")
    engine.load_checkpoint(state_dir, tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=True)
    state = torch.load(os.path.join(state_dir, f"rank{rank}.pt"), weights_only=False)
    return meta["step"], tuple(state["position"]), state["rng"]


def truncate_jsonl(path, max_step):
    """Drop rows logged after the checkpoint (a killed run may have got further): they will be logged again."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError):  # the half-written last line of a killed run
                continue
            if step <= max_step:
                keep.append(line)
    with open(path, "w") as f:
        f.writelines(keep)


def log_samples(output_dir, step, rank, world, batch, completions, reward_names, per_reward, advantages, G):
    """Every rank's rollouts of this step, appended to samples.jsonl by rank 0 (a collective: all ranks call it).
    completion i answers prompt i // G; per_reward (R, B*G), advantages (B*G,)."""
    samples = [{"step": step, "rank": rank, "example": batch["index"][i // G], "video": batch["video"][i // G],
                "data_type": batch.get("data_type", ["video"] * len(batch["index"]))[i // G],
                "question": batch["problem"][i // G], "solution": batch["solution"][i // G], "completion": completion,
                "rewards": {n: r[i].item() for n, r in zip(reward_names, per_reward)},
                "advantage": advantages[i].item()} for i, completion in enumerate(completions)]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, samples)
    if rank == 0:
        with open(os.path.join(output_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for rows in gathered for row in rows)


class MetricsLogger:
    """metrics.jsonl + optional wandb / tensorboard on rank 0; a no-op elsewhere, so callers need no `if`."""

    def __init__(self, cfg, rank, resumed):
        self.active = rank == 0
        self.backend = None
        if not self.active:
            return
        self.file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a" if resumed else "w")
        name = cfg.run_name or os.path.basename(os.path.normpath(cfg.output_dir))
        if cfg.report_to == "wandb":
            import wandb
            self.backend = wandb.init(project="video-grpo", name=name, config=dataclasses.asdict(cfg), resume="allow",
                                      dir=cfg.output_dir)  # its local files with the run: --overwrite_output_dir removes them
        elif cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.backend = SummaryWriter(os.path.join(cfg.output_dir, "tb"))

    def log(self, row):
        if not self.active:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if hasattr(self.backend, "add_scalar"):
            for k, v in row.items():
                self.backend.add_scalar(k, v, row["step"])
        elif self.backend is not None:
            self.backend.log(row, step=row["step"])

    def close(self):
        if self.active:
            self.file.close()
            if hasattr(self.backend, "close"):
                self.backend.close()
            elif self.backend is not None:
                self.backend.finish()
