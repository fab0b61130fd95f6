"""
Checkpoints: the HF model folders train.py writes (save_model), and the training state for exact resume that it
saves every --save_steps and reads back with --resume_from.

    OUTPUT_DIR/checkpoint-<step>/            an HF model folder (weights, tokenizer, preprocessor config), kept;
                                             with LoRA the adapter in peft's format instead of the weights
    OUTPUT_DIR/final/                        the same; with LoRA the merged HF model, its adapter in final/adapter/
    OUTPUT_DIR/checkpoint-<step>/training_state/
        deepspeed/                           the DeepSpeed engine checkpoint: ZeRO shards, optimizer, LR scheduler
        rank<r>.pt                           rank r's position in its data order and its python/numpy/torch RNG states
        trainer_state.json                   {"step": ...}, written last: a checkpoint without it is incomplete

Only the newest --save_total_limit training states are kept (they hold the optimizer: ~12 bytes per parameter);
the HF model folders stay.
"""
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


def save(engine, checkpoint_dir, step, position, rank, save_total_limit):
    """Collective: every rank writes its ZeRO shards and its own position and RNG; rank 0 marks it complete."""
    state_dir = os.path.join(checkpoint_dir, STATE)
    engine.save_checkpoint(state_dir, tag="deepspeed")
    torch.save({"position": position, "rng": rng_state()}, os.path.join(state_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(state_dir, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world_size": torch.distributed.get_world_size()}, f)
        for old in complete_checkpoints(os.path.dirname(checkpoint_dir))[:-save_total_limit or None]:
            shutil.rmtree(os.path.join(old, STATE), ignore_errors=True)
    torch.distributed.barrier()


def complete_checkpoints(output_dir):
    """checkpoint-<step> folders with a complete training state, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and os.path.exists(os.path.join(path, STATE, "trainer_state.json")):
            found.append((int(m.group(1)), path))
    return [path for _, path in sorted(found)]


def find(output_dir, resume_from):
    """The checkpoint folder that --resume_from names ('latest': the newest complete one in output_dir)."""
    if resume_from == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from latest: no complete checkpoint in {output_dir}")
        return found[-1]
    if not os.path.exists(os.path.join(resume_from, STATE, "trainer_state.json")):
        raise FileNotFoundError(f"--resume_from {resume_from}: no {STATE}/trainer_state.json there (incomplete, "
                                f"rotated away by --save_total_limit, or not a checkpoint folder)")
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
