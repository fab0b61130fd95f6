"""
What train.py, eval.py and bench.py share and none of them is about: flags from a config dataclass, the DeepSpeed
config, the process group (one process, torchrun or the deepspeed launcher), rank-0 printing.
"""
import argparse
import dataclasses
import datetime
import importlib
import json
import os
import sys
import types

import torch


def dataclass_parser(cls, description, **special):
    """One --flag per field of a config dataclass, its help from the field; booleans as --flag / --no-flag.
    `special` maps a field name to add_argument keywords that replace the default ones (e.g. action="append")."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        if f.name in special:
            kwargs = special[f.name]
        elif f.type in (bool, "bool"):
            kwargs = dict(action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kwargs = dict(type=type(f.default), default=f.default)
        parser.add_argument(f"--{f.name}", help=f.metadata["help"], **kwargs)
    return parser


class ConfigError(ValueError):
    """A setting that cannot work: reported in one line, exit code 2, before any model is loaded."""


def build_ds_config(cfg):
    """train.py's DeepSpeed config: the ZeRO settings from cfg.deepspeed; batch size, clipping and precision from the
    Config (one source each)."""
    with open(cfg.deepspeed) as f:
        ds = json.load(f)
    owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"}
    clash = sorted(owned & set(ds))
    if clash:
        raise ConfigError(f"{cfg.deepspeed} sets {clash}; these come from train.py's flags, remove them from the file")
    ds.update(train_micro_batch_size_per_gpu=cfg.prompts_per_device * cfg.num_generations,
              gradient_accumulation_steps=1, gradient_clipping=cfg.max_grad_norm, bf16={"enabled": cfg.bf16},
              zero_allow_untested_optimizer=True, steps_per_print=10**9)
    return ds


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


# a rank compiling a new decode shape (minutes at 7B) keeps the others waiting in the next collective: longer than
# the 10-minute default of NCCL and DeepSpeed (docs/performance.md, The rollout's decode)
DIST_TIMEOUT = datetime.timedelta(minutes=30)


def eta(elapsed, steps_done, steps_left):
    """Time left at the mean step time so far, as 9h12m / 4m05s / 12s."""
    left = round(elapsed / max(steps_done, 1) * steps_left)
    h, m, s = left // 3600, left % 3600 // 60, left % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def init_distributed(use_deepspeed=True):
    """The rank, world size and device of this process. use_deepspeed (train.py): always a process group, DeepSpeed's,
    also for one plain `python train.py` process; else (eval.py) a torch group only when there are several ranks."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks on one CPU share its cores: oversubscribed OpenMP threads made CPU steps ~15x slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:  # a free port, so two single-process runs can share a machine
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        if device.type == "cpu":
            skip_cpu_allreduce_build()
            skip_muon_import()
        deepspeed.init_distributed(dist_backend=backend, timeout=DIST_TIMEOUT)
    elif world > 1:
        torch.distributed.init_process_group(backend, timeout=DIST_TIMEOUT)
    return rank, world, device


def skip_cpu_allreduce_build():
    """On CPU, DeepSpeed's process group JIT-compiles a shared-memory all-reduce (deepspeed_shm_comm: 35-90 s and a
    C++ compiler on an environment's first run, under a lock file that a run killed meanwhile leaves behind, hanging
    every later run) and maps a 66 MB /dev/shm buffer per rank that it never unlinks. Only its inference all-reduce
    uses that op; training's collectives are gloo's. So the build is skipped: DeepSpeed falls back as on a machine
    where the op cannot be built."""
    # not `deepspeed.comm.torch`: that attribute is torch itself (deepspeed.comm star-imports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def skip_muon_import():
    """Under ZeRO, deepspeed.initialize imports DeepSpeed's Muon optimizer (to check the optimizer, and in stage 3 to
    ask whether it is one), and that import torch.compiles Muon's kernels: ~1.4 CPU s a rank, on CPU where nothing
    else compiles. train.py's optimizer is AdamW, so a class that nothing is an instance of stands in for Muon's."""
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name not in sys.modules:
        stand_in = types.ModuleType(name)
        stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
        sys.modules[name] = stand_in
