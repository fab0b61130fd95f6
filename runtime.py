"""
What train.py, eval.py and bench.py share and none of them is about: flags from a config dataclass, the DeepSpeed
config, the process group (one process, torchrun or the deepspeed launcher), rank-0 printing.
"""
import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import sys
import types
import zlib

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the script's docstring as written, each flag's default after its help ('' shown as '')."""

    def _get_help_string(self, action):
        return super()._get_help_string(action).replace("(default: %(default)s)", "(default: %(default)r)") \
            if action.default == "" else super()._get_help_string(action)


def dataclass_parser(cls, description, **special):
    """One --flag per field of a config dataclass, its help from the field and its default shown; booleans as --flag /
    --no-flag. A field's metadata "group" puts it under that heading of --help (headings in the order they first
    appear). `special` maps a field name to add_argument keywords that replace the default ones (e.g. action="append")."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    groups = {}
    for f in dataclasses.fields(cls):
        if f.name in special:
            kwargs = special[f.name]
        elif f.type in (bool, "bool"):
            kwargs = dict(action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kwargs = dict(type=type(f.default), default=f.default)
        group = f.metadata.get("group")
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(group)
        add = parser if group is None else groups[group]
        add.add_argument(f"--{f.name}", **{"help": f.metadata["help"], **kwargs})
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


def lr_factor(update, *, warmup_steps, total_updates, scheduler="linear"):
    """train.py's learning-rate schedule, the multiplier at optimizer update `update` (0-based): linear warmup, then
    linear or cosine (transformers' get_cosine_schedule_with_warmup) decay to 0 at total_updates."""
    if update < warmup_steps:
        return (update + 1) / warmup_steps
    left = max(0.0, (total_updates - update) / max(1, total_updates - warmup_steps))  # 1 -> 0 after the warmup
    return left if scheduler == "linear" else 0.5 * (1 - math.cos(math.pi * left))


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


# train.py's collectives over the ranks' loss inputs

def dapo_divisor(mask, world):
    """What each rank divides its dapo token sum by: (completion tokens of all ranks, all-reduced) / world, so that the
    ranks' averaged gradients are DAPO's one token mean over the step (a rank's own count would weigh the tokens of a
    rank of short completions more). mask (N, T) -> float"""
    n = mask.sum().to(torch.float64)
    torch.distributed.all_reduce(n)
    return max(n.item(), 1.0) / world


def gather_entropies(entropies, mask):
    """The entropies of every rank's completion tokens, one (M,) tensor (a collective; ranks hold different counts)."""
    gathered = [None] * torch.distributed.get_world_size()  # a few thousand floats a rank: as objects, no padding
    torch.distributed.all_gather_object(gathered, entropies[mask.bool()].float().cpu())
    return torch.cat(gathered)                                                 # (M,)


def all_ranks(value, device, op="sum"):
    """A number reduced over all ranks: op sum, max or min. -> float"""
    x = torch.tensor(float(value), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(x, op={"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                                        "min": torch.distributed.ReduceOp.MIN}[op])
    return x.item()


def raise_together(error, device):
    """Every rank raises when any rank has an error (one all-reduce of a flag, before any rank raises), so that no rank
    waits in a later collective for one that is gone until DIST_TIMEOUT. error: an exception or None."""
    failed = torch.tensor(float(error is not None), device=device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"rank {torch.distributed.get_rank()}: stopping with another rank that failed (its error is above)")


def same_names(names, device):
    """Every rank holds the same names in the same order, else every rank raises naming the difference. One all-reduce
    of a checksum (the min and max over ranks); the names themselves are gathered only when they differ."""
    names = tuple(names)
    crc = zlib.crc32("\n".join(names).encode())
    x = torch.tensor([crc, -crc], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MIN)
    if x[0] == -x[1]:
        return
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, names)
    common = set.intersection(*map(set, every))
    alone = [f"rank {r} has {sorted(set(n) - common)}" for r, n in enumerate(every) if set(n) - common]
    raise RuntimeError("the metrics differ across ranks, so their all-reduce would not line up: "
                       + ("; ".join(alone) + " that not every rank has" if alone else "the same names in another order"))


def rank_means(metrics, weights, counts, device):
    """The step's metrics over all ranks in one all-reduce: each a mean over ranks or, where `weights` gives this rank's
    weight (its real tokens, its real rows), over those, so that a rank with none (an emptied mask) adds nothing rather
    than a 0 (NaN when no rank has any). counts (numbers) are summed. Every rank must hold the same metric names (in
    the same order; same_names checks it). -> ({name: mean}, [sums])"""
    same_names(metrics, device)  # the all-reduce adds the values by position
    w = [weights.get(k, 1.0) for k in metrics]
    summed = torch.tensor([*(v * x if x else 0.0 for v, x in zip(metrics.values(), w)), *w, *counts],
                          dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    n, summed = len(w), summed.tolist()
    return {k: v / x if x else float("nan") for k, v, x in zip(metrics, summed[:n], summed[n:2 * n])}, summed[2 * n:]


def together(device, fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank; when it raises on any rank, every rank raises (raise_together)."""
    try:
        result, error = fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 -- re-raised on this rank, after every rank has heard of it
        result, error = None, e
    raise_together(error, device)
    return result
