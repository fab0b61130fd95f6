"""
What train.py, eval.py and bench.py share and none of them is about: flags from a config dataclass, the process group
(one process, torchrun or the deepspeed launcher), rank-0 printing.
"""
import argparse
import dataclasses
import datetime
import importlib
import os

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


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


# a rank compiling a new decode shape (minutes at 7B) keeps the others waiting in the next collective: longer than
# the 10-minute default of NCCL and DeepSpeed (docs/performance.md, The rollout's decode)
DIST_TIMEOUT = datetime.timedelta(minutes=30)


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
