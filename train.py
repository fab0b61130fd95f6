"""
GRPO on a video vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5), the Video-R1 recipe, written out by hand.

    deepspeed --num_gpus 4 train.py                 # Video-R1's first trainer's run: Qwen2-VL-7B-Instruct on DVD-counting
    python train.py --tiny                          # offline CPU demo: tiny Qwen2-VL, synthetic videos
    python train.py --tiny --data data/synthetic/train_mc.jsonl   # the same on the multiple-choice split
    python train.py --tiny --tiny_model qwen2.5-vl  # the same on a tiny Qwen2.5-VL; --lora_rank 8: LoRA (peft)
    python train.py --tiny --tiny_model qwen3-vl    # the same on a tiny Qwen3-VL (timestamped frames, DeepStack)
    python train.py --tiny --tiny_model qwen3.5     # the same on a tiny Qwen3.5 (Gated DeltaNet + full attention)
    deepspeed --num_gpus 2 train.py --tiny          # the same under ZeRO-3 on CPU (gloo)
    torchrun --nproc_per_node 4 train.py --max_steps 100 --output_dir runs/short
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 train.py  # on each node

One step, per rank: take `prompts_per_device` (video, question) examples; sample G completions for each in one
batched generation; score them with the rule rewards; standardise the rewards within each group of G into
advantages; compute per-token log-probs of the policy (with grad), the reference model and, for
num_iterations > 1, the old policy; minimise the clipped GRPO objective with a k3 KL penalty. The model passes (rollout,
log-probs, loading) are in model.py; this file holds the config, the rewards-to-loss math and the loop.

Where this departs from the Video-R1 trainer (a copy of TRL's GRPOTrainer of early 2025), and why, each with its
test: docs/video-r1.md. In short: one batched rollout per prompt (prefilled once), the video encoded and the prompt run
once per pass, a reference that sees the video, the release rule's M-RoPE positions in every pass, fp32 log-softmax at
completion positions only, prompts skipped rather than truncated, each completion scored by its own row's type, and
T-GRPO, the length bonus and all_correct/all_wrong reading the run's accuracy reward (--accuracy_reward).
Video-R1's first recipe: --rewards video_r1_first_accuracy,video_r1_format (its frames are the default), evaluated with
eval.py --protocol video-r1-first. Its later recipe (Video-R1-260k, images and videos): --prompt_template video-r1
--rewards video_r1_accuracy,video_r1_format and the flags in docs/video-r1-recipe.md; eval.py --protocol video-r1.
"""
import collections
import contextlib
import dataclasses
import faulthandler
import functools
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import checkpoint
import data
import datatools
import decode
import model
import rewards
import runtime
import tiny
from runtime import ConfigError, eta, print0


@dataclass
class Config:
    # model and data
    model_name_or_path: str = field(default="Qwen/Qwen2-VL-7B-Instruct", metadata={"group": "model", "help": "local HF folder or hub id"})
    data: str = field(default="data/dvd/train_dvd.jsonl", metadata={"group": "data and video", "help": "JSONL (or JSON list) of rows in DVD-counting's or Video-R1-260k's layout, any answer type (docs/data.md)"})
    video_root: str = field(default="", metadata={"group": "data and video", "help": "folder that relative video paths start from ('': the data file's folder)"})
    tiny: bool = field(default=False, metadata={"group": "model", "help": "offline demo: tiny random model + synthetic videos, CPU-sized settings"})
    tiny_model: str = field(default="qwen2-vl", metadata={"group": "model", "help": "--tiny's model family: qwen2-vl, qwen2.5-vl, qwen3-vl or qwen3.5 (made in data/tiny-<name>)"})
    # video (Video-R1's first trainer's settings)
    fps: float = field(default=2.0, metadata={"group": "data and video", "help": "frames sampled per second of video"})
    min_frames: int = field(default=4, metadata={"group": "data and video", "help": "fewest frames per video"})
    max_frames: int = field(default=16, metadata={"group": "data and video", "help": "most frames per video"})
    min_pixels: int = field(default=0, metadata={"group": "data and video", "help": "lower bound on frame area after resizing; 0: 128 merged patches of the model (128*28*28 = 100,352 for Qwen2/2.5-VL, Video-R1's first trainer's; 128*32*32 for Qwen3-VL)"})
    max_pixels: int = field(default=0, metadata={"group": "data and video", "help": "explicit cap on frame area; 0: Video-R1's reader's rule (105,369 at the default min_pixels; vision.frame_size), a value can only lower it"})
    video_max_pixels: int = field(default=0, metadata={"group": "data and video", "help": "the reader's VIDEO_MAX_PIXELS in that rule; 0: 128 merged patches (128*28*28, Video-R1's training); its 32-frame evaluation: 200704 (256*28*28)"})
    video_time: str = field(default="true", metadata={"group": "data and video", "help": "Qwen2.5-VL's seconds per temporal patch: true (2 / sampled fps) or video-r1 (1.0, as Video-R1's later trainer trained; data.VIDEO_TIMES)"})
    image_min_pixels: int = field(default=0, metadata={"group": "data and video", "help": "image rows: lower bound on image area; 0: 4 merged patches (Video-R1's 4*28*28)"})
    image_max_pixels: int = field(default=0, metadata={"group": "data and video", "help": "image rows: upper bound on image area; 0: 256 merged patches (Video-R1's 256*28*28)"})
    max_prompt_length: int = field(default=4096, metadata={"group": "data and video", "help": "longer prompts (video tokens included) are skipped, never truncated"})
    num_workers: int = field(default=2, metadata={"group": "data and video", "help": "DataLoader workers decoding videos"})
    prompt_template: str = field(default="default", metadata={"group": "data and video", "help": "default (per type; numerical: Video-R1's first trainer's words) or video-r1 (Video-R1's later trainer's, byte for byte): data.PROMPT_TEMPLATE_NAMES"})
    # GRPO
    num_generations: int = field(default=8, metadata={"group": "rollout and rewards", "help": "G: completions sampled per prompt"})
    prompts_per_device: int = field(default=1, metadata={"group": "rollout and rewards", "help": "prompts per rank per step (each gets G completions)"})
    max_completion_length: int = field(default=512, metadata={"group": "rollout and rewards", "help": "most new tokens per completion"})
    temperature: float = field(default=1.0, metadata={"group": "rollout and rewards", "help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"group": "rollout and rewards", "help": "sample from the k most likely tokens (Video-R1's first trainer's 50; 0: off)"})
    top_p: float = field(default=1.0, metadata={"group": "rollout and rewards", "help": "sample from the smallest set of tokens with probability >= p (1.0: off)"})
    compile_rollout: str = field(default="auto", metadata={"group": "rollout and rewards", "help": "auto|on|off: decode on a static KV cache with a torch.compile'd step (CUDA graphs); auto: on for CUDA"})
    rewards: str = field(default="accuracy,format", metadata={"group": "rollout and rewards", "help": "comma-separated names from rewards.REWARD_FUNCS"})
    accuracy_reward: str = field(default="", metadata={"group": "rollout and rewards", "help": "the REWARD_FUNCS name the bonuses (rewards.SHAPERS), all_correct/all_wrong and --dynamic_sampling read ('': the first --rewards name containing 'accuracy', else accuracy)"})
    reward_weights: str = field(default="", metadata={"group": "rollout and rewards", "help": "comma-separated weights, one per reward ('': all 1)"})
    scale_rewards: str = field(default="group", metadata={"group": "rollout and rewards", "help": "'group': (r - mean) / (std + 1e-4); 'none': r - mean (Dr. GRPO)"})
    beta: float = field(default=0.04, metadata={"group": "loss", "help": "KL coefficient; 0 skips the reference model"})
    epsilon_low: float = field(default=0.2, metadata={"group": "loss", "help": "lower clip range of the ratio"})
    epsilon_high: float = field(default=0.2, metadata={"group": "loss", "help": "upper clip range of the ratio"})
    loss_type: str = field(default="grpo", metadata={"group": "loss", "help": "a name in train.LOSSES (listed in --help; docs/methods.md)"})
    num_iterations: int = field(default=1, metadata={"group": "optimisation", "help": "mu: optimizer updates per rollout"})
    mask_truncated_completions: bool = field(default=False, metadata={"group": "loss", "help": "drop completions that never emitted EOS from the loss"})
    importance_sampling_level: str = field(default="token", metadata={"group": "loss", "help": "token (GRPO) or sequence (GSPO: one ratio per completion, exp of its mean token log-ratio; the GSPO paper clips it at --epsilon_low 3e-4 --epsilon_high 4e-4)"})
    kl_clamp: float = field(default=0.0, metadata={"group": "loss", "help": "clamp the per-token log-ratio (ref - policy) to [-c, c] before the k3 KL (Video-R1's later trainer: 10); 0 = off"})
    # Video-R1's later trainer (Video-R1-260k): T-GRPO and the length reward, both scored with the accuracy reward
    temporal_contrast: bool = field(default=False, metadata={"group": "rollout and rewards", "help": "T-GRPO: also sample completions on the video with frames shuffled; +alpha to correct ones if p >= mu * p_shuffled"})
    temporal_alpha: float = field(default=0.3, metadata={"group": "rollout and rewards", "help": "T-GRPO: the bonus added to a correct completion's reward"})
    temporal_mu: float = field(default=0.8, metadata={"group": "rollout and rewards", "help": "T-GRPO: the bonus is given when p >= mu * p_shuffled (mean accuracies, per prompt)"})
    shuffled_generations: int = field(default=0, metadata={"group": "rollout and rewards", "help": "T-GRPO: completions per prompt on the shuffled video (0: G // 2)"})
    length_reward: bool = field(default=False, metadata={"group": "rollout and rewards", "help": "in a group with more than one correct completion, +length_bonus to correct ones whose length is in --length_window"})
    length_window: str = field(default="320,512", metadata={"group": "rollout and rewards", "help": "lo,hi: completion lengths (tokens, EOS included) that earn the length bonus"})
    length_bonus: float = field(default=0.2, metadata={"group": "rollout and rewards", "help": "the length reward's bonus"})
    # methods adopted since Video-R1 (docs/methods.md)
    dynamic_sampling: bool = field(default=False, metadata={"group": "rollout and rewards", "help": "DAPO: replace groups of equal accuracy by groups of further prompts, sampled until every rank has prompts_per_device informative ones or --max_resample extra rollouts were spent"})
    max_resample: int = field(default=4, metadata={"group": "rollout and rewards", "help": "--dynamic_sampling: most extra rollouts per step"})
    dynamic_sampling_metric: str = field(default="accuracy", metadata={"group": "rollout and rewards", "help": "--dynamic_sampling keeps groups whose run's accuracy reward varies (DAPO; verl's filter_groups.metric acc), or 'reward': whose total reward varies"})
    top_entropy_quantile: float = field(default=1.0, metadata={"group": "loss", "help": "rho: only the top-rho share of completion tokens by the policy's entropy (all ranks) keep their policy loss (the paper: 0.2; 1.0: off; 0: the top token only)"})
    cispo_epsilon_max: float = field(default=5.0, metadata={"group": "loss", "help": "--loss_type cispo: the cap on the importance weight"})
    sapo_temperature_pos: float = field(default=1.0, metadata={"group": "loss", "help": "--loss_type sapo: the gate's temperature where the advantage is > 0 (TRL's default)"})
    sapo_temperature_neg: float = field(default=1.05, metadata={"group": "loss", "help": "--loss_type sapo: the gate's temperature where the advantage is <= 0 (TRL's default)"})
    # optimisation
    learning_rate: float = field(default=1e-6, metadata={"group": "optimisation", "help": "peak learning rate, decayed to 0 by --lr_scheduler"})
    lr_scheduler: str = field(default="linear", metadata={"group": "optimisation", "help": "linear or cosine decay to 0 after the warmup"})
    warmup_steps: int = field(default=0, metadata={"group": "optimisation", "help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"group": "optimisation", "help": "AdamW weight decay"})
    max_grad_norm: float = field(default=20.0, metadata={"group": "optimisation", "help": "gradient clipping norm"})
    num_train_epochs: int = field(default=2, metadata={"group": "optimisation", "help": "passes over the data (unless max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"group": "optimisation", "help": "stop after this many steps (> 0 overrides num_train_epochs)"})
    bf16: bool = field(default=True, metadata={"group": "optimisation", "help": "bfloat16 weights and compute (--no-bf16 for fp32)"})
    gradient_checkpointing: bool = field(default=True, metadata={"group": "optimisation", "help": "recompute activations in backward to save memory"})
    lora_rank: int = field(default=0, metadata={"group": "model", "help": "LoRA rank (peft); 0: full fine-tuning. With LoRA the reference is the same weights, adapters off"})
    lora_alpha: float = field(default=16.0, metadata={"group": "model", "help": "LoRA scale numerator: the update is (lora_alpha / lora_rank) * B @ A"})
    lora_target_modules: str = field(default="", metadata={"group": "model", "help": "comma-separated Linear name suffixes in the language model ('visual.NAME': the vision tower); '': attention + MLP projections"})
    attn_implementation: str = field(default="auto", metadata={"group": "model", "help": "the vision tower's attention; auto: flash_attention_2 if it imports, on CUDA, in bf16, else sdpa (the language model: packed_attention)"})
    deepspeed: str = field(default="ds_zero3.json", metadata={"group": "optimisation", "help": "DeepSpeed config holding only the ZeRO settings"})
    gather_reference: bool = field(default=True, metadata={"group": "optimisation", "help": "ZeRO-3: gather the full reference weights once for its pass (--no-gather_reference: layer by layer, less memory)"})
    seed: int = field(default=42, metadata={"group": "run and checkpoints", "help": "base seed; rank r uses seed + r"})
    # logging and saving
    save_steps: int = field(default=100, metadata={"group": "run and checkpoints", "help": "save a checkpoint (HF model + training state) every this many steps (0: only final)"})
    save_total_limit: int = field(default=2, metadata={"group": "run and checkpoints", "help": "keep the training state (optimizer etc.) of only the newest N checkpoints (>= 1)"})
    save_model_limit: int = field(default=0, metadata={"group": "run and checkpoints", "help": "keep the HF model files of only the newest N checkpoint-* folders (0: all)"})
    output_dir: str = field(default="runs/video-r1-dvd", metadata={"group": "run and checkpoints", "help": "where checkpoints, metrics.jsonl and samples.jsonl go"})
    resume_from: str = field(default="", metadata={"group": "run and checkpoints", "help": "a checkpoint-<step> folder, or 'latest' (the newest in output_dir)"})
    overwrite_output_dir: bool = field(default=False, metadata={"group": "run and checkpoints", "help": "allow starting a new run in an output_dir that holds one"})
    max_skip_fraction: float = field(default=0.5, metadata={"group": "run and checkpoints", "help": "stop if more than this share of the examples of the last skip_window steps failed"})
    skip_window: int = field(default=20, metadata={"group": "run and checkpoints", "help": "steps over which failed examples are counted"})
    max_bad_steps: int = field(default=3, metadata={"group": "run and checkpoints", "help": "stop after this many updates in a row skipped for a non-finite loss or gradient"})
    log_samples_steps: int = field(default=10, metadata={"group": "logging", "help": "dump rollouts to samples.jsonl every this many steps"})
    report_to: str = field(default="none", metadata={"group": "logging", "help": "none, wandb or tensorboard"})
    run_name: str = field(default="", metadata={"group": "logging", "help": "name for wandb/tensorboard ('': output_dir's name)"})
    local_rank: int = field(default=-1, metadata={"group": "run and checkpoints", "help": "set by the deepspeed launcher; ignore"})


def parse_config(argv=None):
    loss_help = "; ".join(f"{name}: {loss.help}" for name, loss in LOSSES.items())  # the table is the one list
    parser = runtime.dataclass_parser(Config, __doc__, loss_type=dict(type=str, default=Config.loss_type, help=loss_help))
    args, _ = parser.parse_known_args(argv)
    if args.tiny:  # the preset changes defaults; flags given explicitly still win
        parser.set_defaults(**dict(tiny.TRAIN_PRESET, model_name_or_path=f"data/tiny-{args.tiny_model}"))
    return Config(**vars(parser.parse_args(argv)))


def validate_config(cfg):
    if cfg.num_generations < 2:
        raise ConfigError(f"--num_generations {cfg.num_generations}: GRPO compares completions within a group, it needs at least 2")
    if cfg.prompts_per_device < 1 or cfg.max_completion_length < 1 or cfg.num_iterations < 1:
        raise ConfigError("--prompts_per_device, --max_completion_length and --num_iterations must be at least 1")
    unknown = [n for n in cfg.rewards.split(",") if n.strip() not in rewards.REWARD_FUNCS]
    if unknown:
        raise ConfigError(f"--rewards: unknown {unknown}; known: {sorted(rewards.REWARD_FUNCS)} (add one in rewards.py)")
    if rewards.accuracy_reward_name([n.strip() for n in cfg.rewards.split(",")], cfg.accuracy_reward) not in rewards.REWARD_FUNCS:
        raise ConfigError(f"--accuracy_reward {cfg.accuracy_reward!r}: choose one of {sorted(rewards.REWARD_FUNCS)}")
    if cfg.reward_weights and len(cfg.reward_weights.split(",")) != len(cfg.rewards.split(",")):
        raise ConfigError(f"--reward_weights {cfg.reward_weights!r} needs one weight per reward in --rewards {cfg.rewards!r}")
    if min(cfg.min_pixels, cfg.max_pixels, cfg.video_max_pixels, cfg.image_min_pixels, cfg.image_max_pixels) < 0 or \
            cfg.video_time not in data.VIDEO_TIMES or 0 < cfg.image_max_pixels < cfg.image_min_pixels:
        raise ConfigError(f"--min_pixels {cfg.min_pixels} --max_pixels {cfg.max_pixels} --video_max_pixels --image_min_pixels "
                          f"--image_max_pixels: 0 (the default rule) or a bound, image min <= max; --video_time {cfg.video_time!r}: one of {data.VIDEO_TIMES}")
    if cfg.prompt_template not in data.PROMPT_TEMPLATE_NAMES:
        raise ConfigError(f"--prompt_template {cfg.prompt_template!r}: choose one of {data.PROMPT_TEMPLATE_NAMES}")
    if cfg.loss_type not in LOSSES:
        raise ConfigError(f"--loss_type {cfg.loss_type!r}: choose one of {LOSS_TYPES}")
    if loss_error := LOSSES[cfg.loss_type].check(LossSettings.of(cfg)):
        raise ConfigError(f"--loss_type {cfg.loss_type}: {loss_error}")
    if cfg.scale_rewards not in ("group", "none"):
        raise ConfigError(f"--scale_rewards {cfg.scale_rewards!r}: choose 'group' or 'none'")
    if cfg.attn_implementation not in ("auto", "sdpa", "eager", "flash_attention_2"):
        raise ConfigError(f"--attn_implementation {cfg.attn_implementation!r}: choose auto, sdpa, eager or flash_attention_2")
    if cfg.importance_sampling_level not in ("token", "sequence"):
        raise ConfigError(f"--importance_sampling_level {cfg.importance_sampling_level!r}: choose token or sequence")
    if cfg.lr_scheduler not in ("linear", "cosine") or cfg.kl_clamp < 0 or cfg.shuffled_generations < 0:
        raise ConfigError("--lr_scheduler must be linear or cosine; --kl_clamp and --shuffled_generations at least 0")
    if not 0 <= cfg.top_entropy_quantile <= 1 or cfg.max_resample < 0:
        raise ConfigError("--top_entropy_quantile must be in [0, 1] (1: off; 0: only the top entropy), --max_resample >= 0")
    if cfg.dynamic_sampling_metric not in ("accuracy", "reward"):
        raise ConfigError(f"--dynamic_sampling_metric {cfg.dynamic_sampling_metric!r}: choose accuracy or reward")
    if not re.fullmatch(r"\d+,\d+", cfg.length_window) or int(cfg.length_window.split(",")[0]) > int(cfg.length_window.split(",")[1]):
        raise ConfigError(f"--length_window {cfg.length_window!r}: two token counts lo,hi with lo <= hi, e.g. 320,512")
    model.vision_attention(cfg.attn_implementation, None, bf16=cfg.bf16)  # an explicit flash_attention_2 must import
    if cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"--top_k {cfg.top_k} --top_p {cfg.top_p}: top_k >= 0 (0: off), 0 < top_p <= 1")
    if cfg.compile_rollout not in model.COMPILE_ROLLOUT:
        raise ConfigError(f"--compile_rollout {cfg.compile_rollout!r}: choose one of {model.COMPILE_ROLLOUT}")
    if cfg.save_total_limit < 1 or cfg.save_model_limit < 0:
        raise ConfigError(f"--save_total_limit {cfg.save_total_limit}: keep at least 1 training state (the newest, that "
                          f"--resume_from needs); --save_model_limit {cfg.save_model_limit} must be >= 0 (0: keep all)")
    if cfg.report_to not in ("none", "wandb", "tensorboard"):
        raise ConfigError(f"--report_to {cfg.report_to!r}: choose none, wandb or tensorboard")
    if not os.path.isfile(cfg.deepspeed):
        raise ConfigError(f"--deepspeed {cfg.deepspeed}: no such file (the repository's ds_zero3.json holds the ZeRO-3 settings)")
    runtime.build_ds_config(cfg)  # a key that a flag owns (batch size, clipping, precision) is an error here, not after a model load
    # the synthetic set (train.jsonl, train_mc.jsonl, ...) is made on first use
    generated = cfg.tiny and os.path.dirname(os.path.normpath(cfg.data)) == os.path.dirname(tiny.TRAIN_PRESET["data"])
    if not generated and not os.path.isfile(cfg.data):
        raise ConfigError(f"--data {cfg.data}: no such file (the layouts: docs/data.md)")
    if cfg.video_root and not os.path.isdir(cfg.video_root):
        raise ConfigError(f"--video_root {cfg.video_root}: no such folder")
    if cfg.tiny_model not in tiny.TINY_MODELS:
        raise ConfigError(f"--tiny_model {cfg.tiny_model!r}: choose one of {', '.join(tiny.TINY_MODELS)}")
    name = cfg.model_name_or_path
    if cfg.lora_rank < 0:
        raise ConfigError(f"--lora_rank {cfg.lora_rank}: 0 (off) or a positive rank")
    if os.path.isdir(name):
        if model.model_family(name) != "qwen2_5_vl" and cfg.video_time != "true":  # another family: one line, before a load
            raise ConfigError(f"--video_time {cfg.video_time}: only Qwen2.5-VL places video in time by second_per_grid_ts")
        if cfg.lora_rank:
            model.check_lora_targets(name, cfg.lora_target_modules)  # on a meta-device skeleton: no weights read
    else:
        model.check_model_path(name, tiny=cfg.tiny)  # a missing folder: one line; --tiny builds only at data/tiny-<name>
    checkpoint.check_output_dir(cfg)  # a run there: resumed only if unfinished, overwritten only when asked


# ----------------------------------------------------------------------------------------------------------------
# the math: pure functions on tensors

def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """rewards (B*G,) ordered group by group -> advantages (B*G,). A group of equal rewards gets 0, never NaN."""
    assert rewards.numel() % group_size == 0, f"{rewards.numel()} rewards do not split into groups of {group_size}"
    assert group_size >= 2, "GRPO needs at least 2 completions per prompt (the std of one sample is undefined)"
    grouped = rewards.view(-1, group_size)                          # (B, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)          # (B, G)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)  # unbiased std, as Video-R1's first trainer
    elif scale != "none":
        raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale!r}")
    return centered.view(-1)                                        # (B*G,)


def per_token_kl(logps, ref_logps, clamp=0.0):
    """k3 estimator of KL(policy || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0. (N, T) -> (N, T)
    clamp > 0 clips ref - logp to [-clamp, clamp] first (Video-R1's later trainer: 10), so exp cannot overflow."""
    delta = ref_logps - logps
    if clamp > 0:
        delta = delta.clamp(-clamp, clamp)
    return torch.exp(delta) - delta - 1


def sequence_mean_kl(logps, ref_logps, mask):
    """Video-R1's first trainer's logged `kl`: k3 clamped to [-100, 100] as its loss did, averaged over each completion's tokens, then
    over completions (ours, `kl`, is one token mean). (N, T) -> float"""
    kl = per_token_kl(logps, ref_logps).clamp(-100, 100) * mask                 # (N, T)
    return (kl.sum(1) / mask.sum(1).clamp(min=1)).mean().item()


def split_rollout(completion_ids, num_normal, eos_token_ids):
    """T-GRPO's rollout rows: the first num_normal (those of the loss) cut to their longest completion (the shuffled
    rows may have run longer), contiguous for the packed pass; and the rest. (N, C) -> (num_normal, C'), (N - num_normal, C)"""
    normal, shuffled = completion_ids[:num_normal], completion_ids[num_normal:]
    return normal[:, :model.completion_mask(normal, eos_token_ids).sum(1).max()].contiguous(), shuffled


# The loss's knobs, built once from the Config's "loss" fields: a new knob is one flag, grpo_loss's callers never change
LossSettings = dataclasses.make_dataclass("LossSettings", [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(
    Config) if f.metadata["group"] == "loss" or f.name == "max_completion_length"], frozen=True)  # dr_grpo's constant
LossSettings.of = classmethod(lambda cls, cfg: cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}))


# policy terms: ratio (N, T) or (N, 1), adv (N, 1), logps (N, T), settings -> per-token loss, clipped or capped (bool)
def clipped_term(ratio, adv, logps, s):
    """PPO's -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A): a token past the range has no gradient."""
    is_clipped = ((ratio < 1 - s.epsilon_low) & (adv < 0)) | ((ratio > 1 + s.epsilon_high) & (adv > 0))
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - s.epsilon_low, 1 + s.epsilon_high) * adv), is_clipped


def cispo_term(ratio, adv, logps, s):
    """MiniMax-M1: -sg(min(r, eps_max)) A log pi: no token loses its gradient. Capped: either sign of A (TRL: A > 0)."""
    return -torch.clamp(ratio, max=s.cispo_epsilon_max).detach() * adv * logps, ratio > s.cispo_epsilon_max


def sapo_term(ratio, adv, logps, s):
    """SAPO (TRL's "sapo"): a soft gate -sigmoid(tau (r - 1)) 4 / tau A for the clip; at r = 1 the gradient is GRPO's."""
    tau = torch.where(adv > 0, adv.new_tensor(s.sapo_temperature_pos), s.sapo_temperature_neg)  # (N, 1), adv's dtype
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv, torch.zeros_like(ratio, dtype=torch.bool)  # (N, T) or (N, 1)


# A new loss is a policy term and an entry here (validate_config, --help, docs read it); check: settings -> error or None
LossType = collections.namedtuple("LossType", "term average help check", defaults=(lambda s: None,))
LOSSES = {
    "grpo": LossType(clipped_term, "sequence", "clipped, mean over each completion's tokens, then over completions"),
    "dapo": LossType(clipped_term, "token", "clipped, one token mean over the step's completions on all ranks"),
    "dr_grpo": LossType(clipped_term, "constant", "clipped, sum / (completions * max_completion_length): no length bias"),
    "cispo": LossType(cispo_term, "token", "MiniMax-M1's capped, detached weight (--cispo_epsilon_max), token mean as dapo",
                      lambda s: None if s.cispo_epsilon_max > 0 else "--cispo_epsilon_max above 0"),
    "sapo": LossType(sapo_term, "sequence", "SAPO's soft gate (--sapo_temperature_pos/neg) for the clip, mean as grpo",
                     lambda s: None if min(s.sapo_temperature_pos, s.sapo_temperature_neg) > 0 else "temperatures above 0"),
}
LOSS_TYPES = tuple(LOSSES)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, settings, *, dapo_tokens=None, entropy_mask=None,
              num_rows=None):
    """logps, old_logps, ref_logps: (N, T) per-token log-probs of the completions; advantages (N,); mask (N, T);
    settings: a LossSettings (settings.loss_type names the LOSSES entry: its policy term, its average).
    old_logps=None means on-policy (ratio 1, but its gradient is the policy gradient); ref_logps may be None
    when beta == 0. importance_sampling_level "sequence" is GSPO: one ratio per completion, clipped as a whole.
    dapo_tokens: what a "token" average (dapo, cispo) divides this rank's token sum by (None: this batch's own count;
    train() passes all ranks' count / world size, so the averaged gradients are one token mean over the step).
    entropy_mask (N, T): only its tokens keep the policy term (--top_entropy_quantile); the KL term and the token count
    are unchanged. num_rows: what a "sequence" or "constant" average (grpo, sapo, dr_grpo) divides by instead of N
    (--dynamic_sampling: all ranks' real rows / world size, so that filler rows, whose mask is 0, count nowhere; a row
    masked for another reason still counts, as in TRL). Returns (scalar loss, dict of detached stats).
    """
    s = settings
    mask = mask.to(logps.dtype)
    # ratio is 1 when on-policy; kept so the clipped form works for num_iterations > 1
    old_logps = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old_logps                                              # (N, T)
    if s.importance_sampling_level == "sequence":  # GSPO: exp of the mean log-ratio of the completion's tokens
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None]  # (N, 1), broadcast over T
    elif s.importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {s.importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)                                               # (N, T) or (N, 1)
    adv = advantages[:, None]                                                  # (N, 1)
    loss_type = LOSSES[s.loss_type]
    per_token, is_clipped = loss_type.term(ratio, adv, logps, s)               # (N, T) or (N, 1)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask                                   # (N, T)
    kl = None
    if s.beta != 0.0:
        kl = per_token_kl(logps, ref_logps, clamp=s.kl_clamp)                  # (N, T)
        per_token = per_token + s.beta * kl
    rows = mask.size(0) if num_rows is None else num_rows                     # filler rows count nowhere
    if loss_type.average == "sequence":  # mean over each completion's tokens, then over completions; empty rows give 0
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    elif loss_type.average == "token":  # every token of the step weighs the same
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if dapo_tokens is None else dapo_tokens)
    else:  # "constant": no length bias
        loss = (per_token * mask).sum() / (rows * s.max_completion_length)
    n_tokens = mask.sum().clamp(min=1)
    stats = {"clip_ratio": ((is_clipped.to(mask.dtype) * mask).sum() / n_tokens).item(),
             "kl": 0.0 if kl is None else ((kl * mask).sum() / n_tokens).item()}
    return loss, stats


def high_entropy_mask(entropies, mask, top_quantile, all_entropies):
    """--top_entropy_quantile rho ("Beyond the 80/20 Rule"; TRL's get_high_entropy_mask): True on this rank's completion
    tokens whose entropy is >= the (1 - rho) quantile (torch.quantile, linear interpolation) of all_entropies, every
    rank's completion-token entropies. (N, T), (N, T), float, (M,) -> (N, T) bool, threshold (float)"""
    if all_entropies.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool), 0.0
    threshold = torch.quantile(all_entropies.float(), 1 - top_quantile)
    return (entropies >= threshold) & mask.bool(), threshold.item()


# ----------------------------------------------------------------------------------------------------------------
# training: setup, then the step, then the loop

@dataclass
class Run:
    """What setup() builds and every step reads: the models, the data stream and the fixed settings of the run."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    engine: object              # the policy's DeepSpeed engine (optimizer, ZeRO); engine.module is the policy
    ref_engine: object          # the frozen reference's engine; None with LoRA (adapters off) or beta == 0
    scheduler: object
    model_dir: str
    reward_names: list
    reward_funcs: list
    reward_weights: list
    accuracy_reward: object     # what the shapers and all_correct/all_wrong read (--accuracy_reward)
    G_shuffled: int             # T-GRPO's completions per prompt on the shuffled video
    eos_token_ids: list         # ids that end a completion
    suppress: list              # ids never sampled (vision tokens, untrained embedding rows)
    batches: object             # (epoch, batch_index, batch) from the resume position on
    skips: data.SkipSummary     # examples that failed to load during the run, summarised at its end
    logger: object
    start_step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def policy(self):
        return self.engine.module

    @functools.cached_property
    def loss_settings(self):
        return LossSettings.of(self.cfg)


def setup(cfg):
    """Distributed init, data, models, resume: everything before the first step."""
    rank, world, device = runtime.init_distributed()
    # ZeRO-3 calls torch's deprecated reduce_scatter_tensor / all_gather_into_tensor: a two-line FutureWarning per step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                            r"deprecated", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    try:  # before any model loads: a missing checkpoint or one saved by another number of ranks is one line
        resume_dir = checkpoint.find(cfg.output_dir, cfg.resume_from, world) if cfg.resume_from else None
    except ValueError as e:
        raise ConfigError(str(e)) from e
    torch.manual_seed(cfg.seed + rank)  # per rank: ranks sample different completions
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    reward_names = [n.strip() for n in cfg.rewards.split(",")]
    reward_weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else [1.0] * len(reward_names)
    accuracy_name = rewards.accuracy_reward_name(reward_names, cfg.accuracy_reward)  # the shapers, all_correct
    B_max = cfg.prompts_per_device

    model_dir, tokenizer, examples, dataset = setup_data(cfg, rank)
    steps_per_epoch = len(dataset) // (world * B_max)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data}: {len(dataset)} usable examples, fewer than one step of {world} ranks x {B_max} prompts")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.num_train_epochs * steps_per_epoch
    engine, ref_engine, scheduler = setup_models(cfg, model_dir, device, updates=total_steps * cfg.num_iterations)
    eos_token_ids, suppress = model.special_token_ids(tokenizer, engine.module.config.text_config.vocab_size)

    # --- resume: weights, optimizer and schedule from the engine checkpoint; data position and RNG per rank
    start_step, position, rng = 0, (0, 0), None
    if cfg.resume_from:
        start_step, position, rng = checkpoint.load(engine, resume_dir, rank)
        print0(f"resumed from {resume_dir}: step {start_step}, epoch {position[0]}, batch {position[1]}")
    checkpoint.start_run(cfg, rank, start_step, {**dataclasses.asdict(cfg), "world_size": world, "total_steps": total_steps,
                                                 "steps_per_epoch": steps_per_epoch, "model_dir": model_dir,
                                                 "accuracy_reward": accuracy_name})
    logger = checkpoint.MetricsLogger(cfg, rank, resumed=start_step > 0)
    print0(f"{len(examples)} examples, {world} ranks x {B_max} prompts x {cfg.num_generations} completions, "
           f"{steps_per_epoch} steps/epoch, {total_steps} steps")
    batches = data.batches_from(dataset, position, dict(num_workers=cfg.num_workers, collate_fn=functools.partial(
        data.collate, pad_token_id=tokenizer.pad_token_id)), seed=cfg.seed, rank=rank, world=world, batch_size=B_max)
    if rng is not None:
        checkpoint.set_rng_state(rng)
    return Run(cfg=cfg, rank=rank, world=world, device=device, tokenizer=tokenizer, engine=engine, ref_engine=ref_engine,
               scheduler=scheduler, model_dir=model_dir, reward_names=reward_names,
               reward_funcs=[rewards.REWARD_FUNCS[n] for n in reward_names], reward_weights=reward_weights,
               accuracy_reward=rewards.REWARD_FUNCS[accuracy_name],
               G_shuffled=cfg.shuffled_generations or cfg.num_generations // 2,
               eos_token_ids=eos_token_ids, suppress=suppress, batches=batches, skips=data.SkipSummary(stream=sys.stderr, prefix=f"[rank {rank}] "), logger=logger,
               start_step=start_step, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def setup_data(cfg, rank):
    """The model folder, its tokenizer, the data file's examples and their dataset (--tiny: the tiny model and the
    synthetic data made first, on rank 0, while the others wait)."""
    from transformers import AutoTokenizer
    if cfg.tiny:  # the embedded default: made on first use
        if rank == 0:
            if family := model.check_model_path(cfg.model_name_or_path, tiny=True):  # None: a folder given, used as is
                tiny.save_tiny_model(cfg.model_name_or_path, family=family)
            if not os.path.exists(cfg.data):
                datatools.make_synthetic_dataset(os.path.dirname(cfg.data))
        torch.distributed.barrier()
    model_dir = model.resolve_model_dir(cfg.model_name_or_path)
    model.model_family(model_dir)  # a downloaded hub id of another family: the same one-line error
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = data.video_settings_from_pretrained(model_dir, **{k: getattr(cfg, k) for k in data.SETTING_FLAGS})
    try:
        examples = data.load_examples(cfg.data, video_root=cfg.video_root or None, verbose=rank == 0)
    except ValueError as e:  # no usable row: a data problem, reported like a wrong flag
        raise ConfigError(str(e)) from e
    dataset = data.VideoPromptDataset(examples, tokenizer, settings, max_prompt_length=cfg.max_prompt_length,
                                      shuffled_frames=cfg.temporal_contrast, shuffle_seed=cfg.seed,
                                      prompt_template=cfg.prompt_template)
    return model_dir, tokenizer, examples, dataset


def setup_models(cfg, model_dir, device, updates):
    """The policy in a DeepSpeed engine with its optimizer and LR schedule over `updates`; the frozen reference sharded
    the same way (None with LoRA, whose reference is the policy with its adapters off, or with beta 0)."""
    import deepspeed
    ds_config = runtime.build_ds_config(cfg)
    model.partition_at_load(ds_config)  # ZeRO-3: weights partitioned as they load, no whole copy per rank
    policy_model = model.load_model(model_dir, bf16=cfg.bf16, attn_implementation=cfg.attn_implementation, device=device)
    if cfg.gradient_checkpointing:
        model.checkpoint_activations(policy_model)
    if cfg.lora_rank:  # only the adapters train; the reference is the policy with them off: no second model
        policy_model = model.add_lora(policy_model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules)
    lr_lambda = functools.partial(runtime.lr_factor, warmup_steps=cfg.warmup_steps, total_updates=updates, scheduler=cfg.lr_scheduler)
    engine, _, _, scheduler = deepspeed.initialize(
        model=policy_model, model_parameters=model.weight_decay_groups(policy_model, cfg.weight_decay), config=ds_config,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=cfg.learning_rate),  # no decay for biases, norms
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    ref_engine = None
    if cfg.beta != 0.0 and not cfg.lora_rank:
        ref_model = model.load_model(model_dir, bf16=cfg.bf16, attn_implementation=cfg.attn_implementation, device=device)
        ref_model.eval().requires_grad_(False)
        ref_engine = deepspeed.initialize(model=ref_model, config={k: v for k, v in ds_config.items() if k != "gradient_clipping"})[0]
    return engine, ref_engine, scheduler


def rollout(run, batch):
    """G completions per prompt with the policy's current weights; T-GRPO: the shuffled videos ride in the same
    rollout, V more prompts (the video rows', same length) with G~ completions each. Returns (B*G, C) and (V*G~, C) or None."""
    cfg, B, G = run.cfg, len(batch["solution"]), run.cfg.num_generations
    run.policy.eval()  # gradient checkpointing switches the KV cache off in train mode
    videos = sum(kind == "video" for kind in batch["data_type"])  # T-GRPO: only video rows get a shuffled copy
    rollout_batch, counts = (data.shuffled_copy(batch), [G] * B + [run.G_shuffled] * videos) if cfg.temporal_contrast else (batch, G)
    with model.gathered_params(run.engine):
        completion_ids = model.sample_completions(
            run.policy, rollout_batch, num_generations=counts, max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature, eos_token_ids=run.eos_token_ids, suppress_token_ids=run.suppress,
            pad_token_id=run.tokenizer.pad_token_id, top_k=cfg.top_k, top_p=cfg.top_p,
            decode=model.rollout_decode(cfg.compile_rollout, run.device))                       # (B*G, C)
    shuffled_ids = None
    if cfg.temporal_contrast:  # the shuffled rows are only scored; the normal ones lose the pad columns they may share
        completion_ids, shuffled_ids = split_rollout(completion_ids, B * G, run.eos_token_ids)  # (B*G, C'), (B*G~, C)
    # a vision token in a completion would break the video-token count of every later pass
    assert not torch.isin(completion_ids, torch.tensor(run.suppress, device=run.device)).any(), "a suppressed token was sampled"
    return completion_ids, shuffled_ids


# one batch's rollout: ids (B*G, C), loss mask (B*G, C), lengths and truncated (B*G,), texts, T-GRPO's shuffled texts or None
Sampled = collections.namedtuple("Sampled", "completion_ids mask lengths truncated completions shuffled")


def sample(run, batch):
    """The rollout of a batch, with its masks and texts (Sampled)."""
    completion_ids, shuffled_ids = rollout(run, batch)                                    # (B*G, C), (B*G~, C) or None
    mask = model.completion_mask(completion_ids, run.eos_token_ids)                             # (B*G, C)
    truncated = ~torch.isin(completion_ids, torch.tensor(run.eos_token_ids, device=run.device)).any(1)  # (B*G,)
    lengths = mask.sum(1).float()                                                         # (B*G,)
    completions = model.decode_completions(run.tokenizer, completion_ids, mask)
    if run.cfg.mask_truncated_completions:  # still scored (they stay in the group statistics), but no loss
        mask = mask * (~truncated)[:, None].int()
    shuffled = None if shuffled_ids is None else iter(model.decode_completions(
        run.tokenizer, shuffled_ids, model.completion_mask(shuffled_ids, run.eos_token_ids)))  # (V*G~) texts
    if shuffled is not None:  # B*G~, prompt by prompt: an image row's are "" (no shuffled rollout, no temporal bonus)
        shuffled = [next(shuffled) if kind == "video" else "" for kind in batch["data_type"] for _ in range(run.G_shuffled)]
    return Sampled(completion_ids, mask, lengths, truncated, completions, shuffled)


def dynamic_sampling(run, batch, sampled, scores, room=None):
    """DAPO's dynamic sampling: a group of equal accuracy (--dynamic_sampling_metric reward: total reward) has no signal,
    so it is replaced by one of a further prompt, batch after batch, until this rank has prompts_per_device informative
    groups, or --max_resample extra rollouts, or `room` batches (an epoch-based run's data left) were spent. The ranks
    decide together: each takes the same rollouts (a full rank rolls out and discards). Missing groups are filled by
    uninformative ones, filler rows (keep False), in no part of the loss. Returns (batch, Sampled, Scores, keep (B*G,),
    (epoch, batch index, failed, tried) of the extra batches or None, metrics)."""
    cfg, G, B = run.cfg, run.cfg.num_generations, run.cfg.prompts_per_device
    rounds, drawn = [(batch, sampled, scores)], None
    informative = lambda sc: getattr(sc, cfg.dynamic_sampling_metric).view(-1, G).std(1) > 0               # (B,)
    flags = [informative(scores)]
    while True:  # any rank short, and every rank with rollouts and data left (a min of -short, left): all roll out again
        more = torch.tensor([-float(sum(f.sum().item() for f in flags) < B),
                             float(len(rounds) <= min(cfg.max_resample, math.inf if room is None else room))], device=run.device)
        torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MIN)
        if not (more[0] < 0 and more[1] > 0):
            break
        epoch, batch_index, batch, failed, tried = data.next_batch(run)
        drawn = (epoch, batch_index, failed + (drawn[2] if drawn else 0), tried + (drawn[3] if drawn else 0))
        s = sample(run, batch)
        rounds.append((batch, s, runtime.together(run.device, rewards.score, run, batch, s.completions, s.shuffled,
                                                  s.lengths.cpu())))  # a reward raising on one rank: all raise
        flags.append(informative(rounds[-1][2]))
    # informative groups first, in the order drawn; then, if short, uninformative ones
    groups = sorted(((r, b) for r, f in enumerate(flags) for b in range(len(f))), key=lambda rb: not flags[rb[0]][rb[1]])[:B]
    take = lambda i, name, n=G: [getattr(rounds[r][i], name)[b * n:(b + 1) * n] for r, b in groups]  # rows of the groups
    C = max(s.completion_ids.size(1) for _, s, _ in rounds)
    padded = lambda rows, value: torch.cat([torch.nn.functional.pad(x, (0, C - x.size(1)), value=value) for x in rows])
    keep = torch.tensor([bool(flags[r][b]) for r, b in groups], device=run.device).repeat_interleave(G)  # (B*G,)
    sampled = Sampled(padded(take(1, "completion_ids"), run.tokenizer.pad_token_id), padded(take(1, "mask"), 0) * keep[:, None],
                      torch.cat(take(1, "lengths")), torch.cat(take(1, "truncated")), sum(take(1, "completions"), []),
                      None if sampled.shuffled is None else sum(take(1, "shuffled", run.G_shuffled), []))
    scores = rewards.pick_groups([sc for _, _, sc in rounds], groups, G)  # (R, B*G), (B*G,) ...
    items = [data.uncollate(b) for b, _, _ in rounds]
    batch = data.collate([items[r][b] for r, b in groups], run.tokenizer.pad_token_id)
    batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    metrics = {"dynamic/groups_dropped": sum((~f).sum().item() for f in flags), "dynamic/rollouts": len(rounds),
               "dynamic/groups_filled": len(groups) - int(keep.sum()) // G}
    return batch, sampled, scores, keep, drawn, metrics


def reference_logps(run, batch, completion_ids):
    """The reference model's per-token log-probs (B*G, C), fixed for the step. Under ZeRO-3 its weights are gathered
    once for the pass (--gather_reference), not layer by layer."""
    cfg = run.cfg
    gather = model.gathered_params(run.ref_engine or run.engine) if cfg.gather_reference else contextlib.nullcontext()
    with gather, model.reference(run.policy, run.ref_engine) as ref_model:  # LoRA: the policy, adapters disabled
        return model.completion_logps_shared_prompt(ref_model, batch, completion_ids, num_generations=cfg.num_generations,
                                                    temperature=cfg.temperature)         # (B*G, C)


def policy_update(run, batch, completion_ids, advantages, mask, ref_logps, num_rows=None):
    """num_iterations (mu) optimizer updates on one rollout; a non-finite loss on any rank skips the update on all of
    them. Returns (the last pass's log-probs (B*G, C), its loss and stats, grad norm, why the update was skipped:
    None, "loss" or "gradient")."""
    cfg, policy, top_entropy = run.cfg, run.policy, run.cfg.top_entropy_quantile < 1.0
    logps_of = functools.partial(model.completion_logps, policy, batch, completion_ids, num_generations=cfg.num_generations,
                                 temperature=cfg.temperature, entropy=top_entropy)
    passes = lambda: logps_of() if top_entropy else (logps_of(), None)  # log-probs (B*G, C), entropies (B*G, C) or None
    policy.train()
    old_logps = None
    if cfg.num_iterations > 1:  # the policy pass itself, without grad: the first ratio is exactly 1
        with torch.no_grad():
            old_logps = passes()[0]                                                     # (B*G, C)
    dapo_tokens = runtime.dapo_divisor(mask, run.world) if LOSSES[cfg.loss_type].average == "token" else None
    skipped = None
    for _ in range(cfg.num_iterations):
        logps, entropies = passes()                                                     # (B*G, C), (B*G, C) or None
        entropy_mask = None
        if top_entropy:  # the threshold is over every rank's tokens, recomputed each pass as the policy moves
            entropy_mask, threshold = high_entropy_mask(entropies, mask, cfg.top_entropy_quantile,
                                                        runtime.gather_entropies(entropies, mask))  # (B*G, C)
        loss, loss_stats = grpo_loss(logps, old_logps, ref_logps, advantages, mask, run.loss_settings,
                                     dapo_tokens=dapo_tokens, entropy_mask=entropy_mask, num_rows=num_rows)
        if top_entropy:
            loss_stats.update(entropy=((entropies * mask).sum() / mask.sum().clamp(min=1)).item(), entropy_threshold=threshold)
        finite = torch.tensor(float(torch.isfinite(loss)), device=run.device)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            skipped = "loss"
            break
        run.engine.backward(loss)
        run.engine.step()  # under ZeRO, DeepSpeed itself discards an update whose gradient norm is not finite
    grad_norm = run.engine.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    if skipped is None and not math.isfinite(grad_norm):
        skipped = "gradient"
    return logps, loss, loss_stats, grad_norm, skipped


def step_metrics(run, batch, completions, *, reward, per_reward, extra, lengths, truncated, loss, loss_stats, logps,
                 ref_logps, mask, real, rollout_time):
    """This rank's metrics of the step, by name (docs/training.md, Metrics); the loop averages them over ranks."""
    G = run.cfg.num_generations
    return {"loss": loss.item(), "reward": reward.mean().item(), "reward_std": reward.view(-1, G).std(1).mean().item(),
            **{f"rewards/{n}": r.mean().item() for n, r in zip(run.reward_names, per_reward)},
            **loss_stats, "completion_length": lengths.mean().item(),  # kl, clip_ratio; entropy, entropy_threshold
            "truncated_ratio": truncated.float().mean().item(),
            "frac_zero_std_groups": (reward.view(-1, G).std(1) == 0).float().mean().item(), **extra,
            "rollout_time": rollout_time, "video_r1_first/completion_length": lengths.mean().item(),
            "video_r1_first/kl": (0.0 if run.cfg.beta == 0 else float("nan") if logps is None or not real.any() else
                        sequence_mean_kl(logps.detach()[real], ref_logps[real], mask[real])),  # real rows only
            **rewards.findings_metrics(  # thinking length, empty thoughts, answer variety
                completions, G, lambda text: len(run.tokenizer(text, add_special_tokens=False)["input_ids"]), **batch["columns"]),
            **rewards.video_r1_first_metrics(completions, batch["solution"], G)}  # Video-R1's first trainer's names (docs/training.md)


# what grpo_step returns: this rank's metrics (by name) and what each is weighted by across ranks, the rollout for
# samples.jsonl (texts, per-reward scores (R, B*G), advantages (B*G,)), its completion token count, the grad norm, why
# the update was skipped (None, "loss", "gradient", "signal": no informative group on any rank) and the batch trained on.
# The data position is the loop's: grpo_step returns it beside (the batches --dynamic_sampling drew), not in here.
StepResult = collections.namedtuple("StepResult", "metrics weights completions per_reward advantages tokens grad_norm skipped batch")


def grpo_step(run, batch, room=None):
    """One GRPO step on this rank's batch: rollout, rewards, advantages, log-probs, loss and update(s), metrics. room:
    --dynamic_sampling in an epoch-based run, the batches left in its last epoch (no draw goes past them). Returns
    (StepResult, (epoch, batch index, failed, tried) of the batches --dynamic_sampling drew, or None)."""
    cfg, G = run.cfg, run.cfg.num_generations
    # rollout: G completions per prompt, with the policy's current weights; rewards, each scored once
    t_rollout = time.time()
    sampled, keep, drawn, dynamic = sample(run, batch), None, None, {}
    scores = rewards.score(run, batch, sampled.completions, sampled.shuffled, sampled.lengths.cpu())  # (R, B*G), (B*G,) ...
    if cfg.dynamic_sampling:  # groups of equal accuracy replaced by groups of further prompts
        batch, sampled, scores, keep, drawn, dynamic = dynamic_sampling(run, batch, sampled, scores, room)
    rollout_time = time.time() - t_rollout
    completion_ids, mask, lengths, truncated, completions, shuffled = sampled             # (B*G, C), (B*G, C), (B*G,) x2
    real = torch.ones(len(completions), dtype=torch.bool, device=run.device) if keep is None else keep  # (B*G,) not filler

    # advantages, within each group of G
    advantages = group_advantages(scores.reward, G, scale=cfg.scale_rewards).to(run.device)  # (B*G,)
    # --dynamic_sampling: grpo and dr_grpo divide by all ranks' real rows / world: one mean over the step's real rows
    num_rows = None if keep is None else runtime.all_ranks(keep.sum(), run.device) / run.world
    if num_rows == 0:  # no informative group on any rank: no pass, no engine.step (weights and Adam moments unmoved)
        logps = ref_logps = None
        loss, grad_norm, skipped = torch.tensor(math.nan), math.nan, "signal"
        stats = ("clip_ratio", "kl") + (("entropy", "entropy_threshold") if cfg.top_entropy_quantile < 1 else ())
        loss_stats = dict.fromkeys(stats, math.nan)
    else:  # log-probs: the reference's, fixed for the step; then the policy's, with grad, and mu updates
        ref_logps = reference_logps(run, batch, completion_ids) if cfg.beta != 0.0 else None   # (B*G, C)
        logps, loss, loss_stats, grad_norm, skipped = policy_update(run, batch, completion_ids, advantages, mask,
                                                                    ref_logps, num_rows)

    metrics = step_metrics(run, batch, completions, reward=scores.reward, per_reward=scores.per_reward,
                           extra=rewards.score_metrics(scores, G), lengths=lengths, truncated=truncated, loss=loss,
                           loss_stats=loss_stats, logps=logps, ref_logps=ref_logps, mask=mask, real=real,
                           rollout_time=rollout_time)
    # what a metric is averaged over across ranks: the real tokens (token means), the real rows (video_r1_first/kl), else ranks
    weights = dict.fromkeys(("kl", "clip_ratio", "entropy"), mask.sum().item()) | {"video_r1_first/kl": real.sum().item()}
    return StepResult({**metrics, **dynamic}, weights, completions, scores.per_reward, advantages, lengths.sum().item(),
                      grad_norm, skipped, batch), drawn


def batches_consumed(run, position):
    """An epoch-based --dynamic_sampling run: the batches consumed so far (the most of any rank, which may have replaced
    a failed batch); the LR schedule, counted in batches, is moved up to them."""
    consumed = runtime.all_ranks(position[0] * run.steps_per_epoch + position[1], run.device, op="max")
    while run.scheduler.last_epoch < consumed * run.cfg.num_iterations:  # each batch as many updates as a step
        run.scheduler.step()
    return consumed


def train(cfg):
    run = setup(cfg)
    rank, world, engine, total_steps = run.rank, run.world, run.engine, run.total_steps
    preempted = []
    signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))  # cluster pre-emption: save, then stop
    recent_failures = []  # (examples failed, examples tried) of the last skip_window steps, over all ranks
    bad_steps = 0

    # --dynamic_sampling takes 1 + extra batches a step: an epoch-based run ends when num_train_epochs passes of data are
    # consumed, its schedule counting batches (total_steps is then the batches of the run, an upper bound on its steps)
    until_data = cfg.dynamic_sampling and cfg.max_steps <= 0
    t_start, step = time.time(), run.start_step
    for step in range(run.start_step + 1, total_steps + 1):
        t0 = time.time()
        epoch, batch_index, batch, failed, tried = data.next_batch(run)
        out, drawn = grpo_step(run, batch, total_steps - (epoch * run.steps_per_epoch + batch_index + 1) if until_data else None)
        if drawn:  # --dynamic_sampling took further batches: the data position and load counts include them
            epoch, batch_index, failed, tried = drawn[0], drawn[1], failed + drawn[2], tried + drawn[3]
        position = (epoch, batch_index + 1)
        last = step == total_steps or (until_data and batches_consumed(run, position) >= total_steps)
        bad_steps = bad_steps + 1 if out.skipped in ("loss", "gradient") else 0
        if out.skipped:
            print0(f"warning: step {step}: update skipped, " + ("no informative group on any rank (--dynamic_sampling)"
                                                                if out.skipped == "signal" else f"non-finite {out.skipped}"))
        if bad_steps >= cfg.max_bad_steps:
            raise RuntimeError(f"step {step}: {bad_steps} updates in a row skipped for a non-finite loss or gradient. "
                               f"Likely causes: learning rate too high (--learning_rate {cfg.learning_rate}), fp16/bf16 "
                               f"overflow (try --no-bf16 on a small run), a corrupt video giving NaN pixels, or a reward "
                               f"returning NaN (rewards: {run.reward_names})")

        # metrics: means over all ranks, or over their real tokens or rows (out.weights); counts summed; one row per step
        means, (tokens, failed, tried) = runtime.rank_means(out.metrics, out.weights, [out.tokens, failed, tried], run.device)
        preempt = runtime.all_ranks(bool(preempted), run.device, op="max")  # any rank signalled: all save and stop
        step_time = time.time() - t0
        row = {"step": step, "epoch": round(epoch + position[1] / run.steps_per_epoch, 4), **means,
               "grad_norm": out.grad_norm, "lr": run.scheduler.get_last_lr()[0], "step_time": step_time,
               "tokens_per_sec": tokens / step_time,
               "skipped_examples": int(failed), "skipped_update": int(out.skipped is not None)}
        run.logger.log(row)
        print0(f"step {step}/{total_steps} | reward {row['reward']:.3f} | "
               + "".join(f"{n} {row['rewards/' + n]:.3f} | " for n in run.reward_names)
               + f"len {row['completion_length']:.0f} | kl {row['kl']:.4f} | loss {row['loss']:.4f} | "
               f"grad {row['grad_norm']:.3f} | {step_time:.1f}s | eta {eta(time.time() - t_start, step - run.start_step, total_steps - step)}")
        recent_failures = (recent_failures + [(failed, tried)])[-cfg.skip_window:]
        window_failed, window_tried = map(sum, zip(*recent_failures))
        if window_failed > cfg.max_skip_fraction * window_tried and window_tried >= cfg.skip_window * cfg.prompts_per_device * world / 2:
            raise RuntimeError(f"step {step}: {window_failed:.0f} of the last {window_tried:.0f} examples failed to load "
                               f"(> --max_skip_fraction {cfg.max_skip_fraction}); see the skipped: warnings for the files")

        if cfg.log_samples_steps > 0 and step % cfg.log_samples_steps == 0:  # every rank's rollouts, rank 0 writes
            checkpoint.log_samples(cfg.output_dir, step, rank, world, out.batch, out.completions, run.reward_names,
                                   out.per_reward, out.advantages, cfg.num_generations)
        if not last and (preempt or (cfg.save_steps > 0 and step % cfg.save_steps == 0)):
            checkpoint_dir = os.path.join(cfg.output_dir, f"checkpoint-{step}")
            with checkpoint.writing(checkpoint_dir, rank):  # a failed write: one line, and `latest` stays the last whole one
                checkpoint.save_model(engine, run.tokenizer, run.model_dir, checkpoint_dir, rank)
                checkpoint.save(engine, checkpoint_dir, step, position, rank, cfg.save_total_limit, cfg.save_model_limit)
        if preempt and not last:  # in the last step: go on to write final/, as a finished run does
            print0(f"SIGTERM: saved {cfg.output_dir}/checkpoint-{step}; continue with --resume_from latest")
            run.skips.print_summary()
            run.logger.close()
            return cfg.output_dir
        if last:
            break

    run.skips.print_summary()  # the examples that failed to load: counts per reason
    with checkpoint.writing(os.path.join(cfg.output_dir, "final"), rank):
        checkpoint.save_model(engine, run.tokenizer, run.model_dir, os.path.join(cfg.output_dir, "final"), rank, merge_lora=True)
        if rank == 0:  # only a whole final/ finishes the run; from here on --resume_from refuses it
            checkpoint.mark_finished(cfg.output_dir, step)  # an epoch-based --dynamic_sampling run ends early
    run.logger.close()
    if rank == 0:
        import plot
        plot.plot_run(cfg.output_dir)
    if model.rollout_decode(cfg.compile_rollout, run.device) == "compiled":  # gpu_check.sh reads the shapes and graphs
        print0(f"compiled rollout: {decode.decode_state(run.device)}")
    print0(f"done: {cfg.output_dir}/final")
    return cfg.output_dir


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not faulthandler.is_enabled():  # a rank killed by a signal (SIGSEGV, SIGABRT) prints each thread's Python stack
        faulthandler.enable()
    cfg = parse_config(argv)
    try:
        validate_config(cfg)
        train(cfg)
        if torch.distributed.is_initialized():  # ranks leave together, no collective in flight when the groups close:
            torch.distributed.barrier()  # seen once in CI: a rank closing while rank 0 wrote the model died of SIGABRT
    except (ConfigError, model.ModelError, FileNotFoundError, checkpoint.SaveError) as e:  # one line each
        failed_save = isinstance(e, checkpoint.SaveError)  # a full disk: exit 1, said by the rank it hit; a wrong flag: 2
        if failed_save or int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if failed_save else 2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
