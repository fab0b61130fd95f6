"""
What a run writes: the HF model folders (save_model), the training state for exact resume that it saves every
--save_steps and reads back with --resume_from, and metrics.jsonl (MetricsLogger).

    OUTPUT_DIR/checkpoint-<step>/            an HF model folder (weights, tokenizer, preprocessor config), kept;
                                             with LoRA the adapter in peft's format instead of the weights
    OUTPUT_DIR/final/                        the same; with LoRA the merged HF model, its adapter in final/adapter/
    OUTPUT_DIR/checkpoint-<step>/training_state/
        deepspeed/                           the DeepSpeed engine checkpoint: ZeRO shards, optimizer, LR scheduler
        rank<r>.pt                           rank r's position in its data order and its python/numpy/torch RNG states
        trainer_state.json                   {"step": ...}, written last: a checkpoint without it is incomplete

A resumed run deletes, at its first save, the checkpoint folders of the run it left behind that are newer than the
one it writes (it would write over them when it got there), so `--resume_from latest` is always the newest save.
Only the newest --save_total_limit training states are kept (they hold the optimizer: ~12 bytes per parameter);
the HF model files of only the newest --save_model_limit checkpoint folders (0: all). At 7B a training state is
~100 GB (fp32 master weights and two Adam moments, in ZeRO shards), a model folder 16.6 GB (bf16).
"""
import dataclasses
import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch

STATE = "training_state"


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
        with open(os.path.join(state_dir, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world_size": torch.distributed.get_world_size()}, f)
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
            self.backend = wandb.init(project="video-grpo", name=name, config=dataclasses.asdict(cfg), resume="allow")
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
