"""
Benchmark of one GRPO step as train.py takes it, phase by phase, against Video-R1's first trainer's way of doing the same work.

    python bench.py --shape tiny                              # CPU: tiny random Qwen2-VL, both ways, the speedup per phase
    python bench.py --shape tiny --sweep                      # how the step cost grows with frames and with G (ours)
    python bench.py --shape tiny --threads 1                  # a busy CPU: 2 OpenMP threads beside another process ran ~5x slower
    python bench.py --shape 2b --device cuda                  # Qwen2-VL-2B-Instruct's architecture, random weights, bf16
    python bench.py --shape 7b --device cuda --only ours      # 7B: the optimizer phase is skipped where it cannot fit
    python bench.py --shape 2b --layers 2 --only ours         # CPU: a 2-layer slice of 2B's widths, Video-R1's first trainer's sizes
    python bench.py --shape 2.5-7b --device cuda --only ours  # Qwen2.5-VL-7B-Instruct's architecture (also 2.5-3b)
    python bench.py --shape qwen3-vl-8b --memory 4            # Qwen3-VL-2B/4B/8B-Instruct's (qwen3-vl-2b|4b|8b)
    python bench.py --shape 7b --memory 4                     # GiB per GPU of a train.py run on 4 GPUs, full and LoRA
    python bench.py --shape qwen3.5-2b --memory 4             # Qwen3.5-2B at assumed sizes (bench.QWEN3_5, docs/models.md)
    python bench.py --shape 2b --memory 1 --layers 2 --check_memory   # + the one-process terms measured on CPU
    python bench.py --shape tiny --frames 4 --num_generations 2 --completion_tokens 4 --repeats 1   # CI smoke run
    python bench.py --shape tiny --temporal_contrast --only ours  # the added cost of T-GRPO per step (way "tgrpo")
    python bench.py --shape tiny --dynamic_sampling --only ours   # what each extra rollout of --dynamic_sampling costs
    python bench.py --shape tiny --only ours --threads 1 --completion_tokens 64   # decode ms/token: eager, static, compiled
    python bench.py --shape tiny --tiny_model qwen3-vl --only ours --decode eager,static   # another family's tiny model

Nothing is downloaded. `--shape 2b|7b` builds Qwen2VLForConditionalGeneration from the published config.json values
of Qwen/Qwen2-VL-2B-Instruct / -7B-Instruct (below) with random weights, `--shape 2.5-3b|2.5-7b` likewise
Qwen2_5_VLForConditionalGeneration from Qwen2.5-VL-3B/7B-Instruct's (the video at 2 fps: second_per_grid_ts 1.0),
`--shape qwen3-vl-2b|4b|8b` Qwen3VLForConditionalGeneration from Qwen3-VL-2B/4B/8B-Instruct's (16-px patches: the same
clip at 128*32*32 pixels is 320x448, the same grid; each frame pair timed as at 2 fps from a 24-fps clip); the tokenizer is tiny.py's (only token ids
matter: the special ids it gives are set in the model config and lie inside the real vocabulary). `--layers N` keeps
the first N decoder layers and N vision blocks at full width: where a whole 2B model is too slow (a CPU), per-layer
costs and the balance of attention against matrix products stay those of the real shape. The video is
Video-R1's first trainer's: 16 random frames of a 320x240 clip, smart-resized at min_pixels = max_pixels = 128*28*28 to 280x392, so
grid (8, 20, 28) and 1120 video tokens, patched by vision.video_to_patches.

A step, phase by phase (each way times the same work: B prompts x G completions of exactly --completion_tokens).
Ours is train.py's own step functions on a train.Run of this process (step_run: train.py's defaults at this shape, a
PlainEngine in DeepSpeed's place, a one-process gloo group for the step's all-reduces); bench.py has no copy of it.
  rollout          ours: train.rollout -> sample_completions (video encoded and prompt prefilled once, KV cache
                   repeated G times; top_k 50, as train.py's and generate's default)
                   first: G separate HF `generate` calls, each encoding the video and prefilling the prompt again
  ref_logps        ours: train.reference_logps -> completion_logps_shared_prompt (vision tower and prompt once per prompt, the G
                   completions on its repeated KV cache, logits only at the completion positions)
                   first: video repeated G times, full-vocabulary logits over the whole sequence, log-softmax at
                   every position row by row, then the completion slice (`baseline_logps`)
  policy_fwd_bwd   the log-prob pass with grad, train.grpo_loss (beta 0.04), backward. Ours: train.policy_update
                   less its engine's step -> completion_logps
                   (each prompt packed with its G completions into one row, packed_attention); with --policy_pass
                   per_completion, the pass as it was before packing (`per_completion_logps`), to isolate that gain.
                   First: baseline_logps.
  optimizer        clip the gradient norm at 20, torch AdamW step, zero the gradients (ours: the engine's step
                   inside train.policy_update, timed apart)
With --temporal_contrast a third way, "tgrpo", is ours with T-GRPO's rollout (train.py --temporal_contrast): the B
prompts on their shuffled videos join the rollout, G // 2 completions each, one more vision pass per prompt; the
other phases are ours (shuffled completions never enter the loss). Scoring them (decode + accuracy) is not timed.
With --dynamic_sampling: what train.py --dynamic_sampling adds per extra rollout, i.e. ours' rollout phase of another
batch of the same shape, plus joining the kept groups of two batches into one (data.uncollate, data.collate), timed;
scoring the extra groups is not timed. JSON keys dynamic_extra_rollout_s, dynamic_join_s.

Where this departs from a real training step, and why:
 1. EOS ids are suppressed (never sampled), so every completion has exactly --completion_tokens tokens and runs compare.
 2. The reference pass runs on the policy's weights (in eval mode, no grad): the same FLOPs as a separate reference
    model, without a second copy of the weights in memory.
 3. Video-R1's first trainer's reference pass got no video (a bug, see train.py's docstring); its baseline here gets the video, so
    both ways do equal work. Its log-probs equal ours (test_bench.py checks it).
 4. The optimizer is plain torch AdamW on the model's own parameters (bf16 states on GPU). The real 7B run uses
    DeepSpeed ZeRO-3 over 4 GPUs (fp32 master weights and Adam states, sharded); one GPU cannot hold that. With
    `--optimizer auto` the phase runs when gradients + AdamW states fit in 60% of the memory left after the model,
    so it is skipped for 7b on an 80 GB GPU and for 2b/7b on CPU (fp32: 16 bytes per parameter, ~35 GB for 2b).
 5. Single process, no ZeRO: the parameter gathering and communication of a multi-GPU run are not measured.

Reported: seconds per phase (median of --repeats steps after one warm-up step); rollout tokens/s (generated tokens);
for the log-prob passes tokens/s (all B*G*(prompt + completion) positions), achieved TFLOP/s and, on CUDA, MFU. The
FLOPs are those the step needs, counted the same for both ways: 2*N per token forward, 6*N forward + backward, with N
split into the vision tower (once per video patch, its merger once per merged token), the decoder body (every
position) and the LM head (completion positions only); attention scores and the recompute of gradient checkpointing
are left out, as in 6N. So Video-R1's first trainer's redundant work shows as lower MFU, and our log-prob passes, which run the
prompt once rather than G times, as an effective rate above what the hardware does. Peak memory: torch.cuda.max_memory_allocated
per phase on CUDA; on CPU the process's max RSS so far (ours runs first, so the baseline's figure is a max of both).
Then (--decode on, the default) the rollout's decode alone, by measure_decode: prefill seconds, and milliseconds
per decoded token for sample_completions' three paths, eager (the reference loop), static (decode_step on a static KV
cache, eager) and compiled (that step under torch.compile, CUDA graphs on CUDA), with profiler operations per token
(CUDA kernels per token on a GPU) and the compile time; JSON keys decode_ms_per_token_eager, _static, _compiled,
ops_per_token_*, kernels_per_token_*, graph_replays_per_token_*, prefill_s, compile_s, decode_speedup (--decode
eager,static: those paths only), and what the compiled path keeps: decode_caches, decode_shapes (rows x cache width:
compiled or eager), cuda_graphs, cudagraph_skips. BENCH_PROFILE=1 prints each path's profiler table. --compile_rollout sets the path of ours' rollout phase in the step table, as train.py's flag.
The last line, `BENCH_JSON {...}`, holds every number.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch

import data
import model as model_lib
import runtime
import tiny
import train
import vision
from decode import decode_shape, decode_state
from model import (checkpoint_activations, completion_logps, completion_logps_shared_prompt, has_linear_attention, hf_model,
                   lora_targets, position_inputs, prefill, prompt_positions, rollout_decode, sample_completions,
                   selective_log_softmax, special_token_ids, use_packed_attention, vision_features, vision_attention)


@dataclass
class Args:
    shape: str = field(default="tiny", metadata={"group": "the step's shape", "help": "tiny, 2b, 7b, 2.5-3b, 2.5-7b, qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b or qwen3.5-2b (Qwen2-VL-2B/7B-, Qwen2.5-VL-3B/7B-, Qwen3-VL-2B/4B/8B-Instruct's architecture; Qwen3.5-2B's assumed one: QWEN3_5; random weights)"})
    tiny_model: str = field(default="qwen2-vl", metadata={"group": "the step's shape", "help": "--shape tiny: the family of the tiny model, qwen2-vl, qwen2.5-vl or qwen3-vl (as train.py --tiny_model)"})
    frames: int = field(default=16, metadata={"group": "the step's shape", "help": "video frames (Video-R1's first trainer: 16); 2 frames make one temporal patch"})
    num_generations: int = field(default=8, metadata={"group": "the step's shape", "help": "G: completions per prompt"})
    completion_tokens: int = field(default=512, metadata={"group": "the step's shape", "help": "tokens per completion, exactly (EOS is suppressed)"})
    prompts: int = field(default=1, metadata={"group": "the step's shape", "help": "B: prompts (videos) per step"})
    device: str = field(default="", metadata={"group": "how it runs", "help": "cpu or cuda ('': cuda when available)"})
    repeats: int = field(default=3, metadata={"group": "how it runs", "help": "timed steps per way after one warm-up step; the median is reported"})
    only: str = field(default="", metadata={"group": "how it runs", "help": "ours, baseline or both ('': both; ours under --sweep)"})
    sweep: bool = field(default=False, metadata={"group": "how it runs", "help": "step cost over frames (4, 8, 16, 32) and over G (4, 8, 16)"})
    gradient_checkpointing: str = field(default="auto", metadata={"group": "how it runs", "help": "on, off or auto (on for 2b/7b, off for tiny, as train.py)"})
    optimizer: str = field(default="auto", metadata={"group": "how it runs", "help": "on, off or auto (on when grads + AdamW states fit, see docstring)"})
    layers: int = field(default=0, metadata={"group": "the step's shape", "help": "non-tiny shapes: keep the first N decoder layers and N vision blocks (0: all)"})
    policy_pass: str = field(default="packed", metadata={"group": "how it runs", "help": "ours: packed (train.py's) or per_completion (before packing)"})
    attn_implementation: str = field(default="auto", metadata={"group": "how it runs", "help": "the vision tower's: auto = flash_attention_2 on CUDA when importable, else sdpa; the language model runs packed_attention"})
    peak_tflops: float = field(default=0.0, metadata={"group": "how it runs", "help": "peak dense bf16 TFLOP/s for MFU (0: known GPUs, see PEAK_TFLOPS)"})
    seed: int = field(default=0, metadata={"group": "the step's shape", "help": "seed of the weights, the video and the sampling"})
    memory: int = field(default=0, metadata={"group": "extra measurements", "help": "print the per-GPU memory estimate of a train.py run on this many GPUs (ZeRO-3), full and LoRA, and exit"})
    lora_rank: int = field(default=64, metadata={"group": "extra measurements", "help": "--memory: the LoRA rank of its LoRA column"})
    image_max_pixels: int = field(default=0, metadata={"group": "extra measurements", "help": "--memory: the largest image row (train.py's flag; 0: 256 merged patches): the prompt length P is the longer of the video's and the image's"})
    check_memory: bool = field(default=False, metadata={"group": "extra measurements", "help": "--memory with --layers: also measure, on CPU in bf16 at those layers, what one process allocates (the rollout's KV cache, the policy pass's peak) beside the estimate"})
    threads: int = field(default=0, metadata={"group": "how it runs", "help": "CPU: torch threads (0: torch's default); 1 is steadier on a busy machine"})
    temporal_contrast: bool = field(default=False, metadata={"group": "extra measurements", "help": "also time way 'tgrpo' (T-GRPO's rollout, see docstring) and report its added cost per step"})
    dynamic_sampling: bool = field(default=False, metadata={"group": "extra measurements", "help": "also report what each extra rollout of train.py --dynamic_sampling adds to ours' step (see docstring)"})
    compile_rollout: str = field(default="auto", metadata={"group": "how it runs", "help": "ours' rollout phase: auto|on|off, as train.py (auto: compiled decode on CUDA)"})
    decode: str = field(default="on", metadata={"group": "extra measurements", "help": "on: also time prefill and decode ms/token eager, static and compiled, and count ops per step (see docstring); or a comma list of those paths; off"})
    decode_tokens: int = field(default=0, metadata={"group": "extra measurements", "help": "completion tokens for the decode measurement (0: --completion_tokens)"})


def parse_args(argv=None):
    args = Args(**vars(runtime.dataclass_parser(Args, __doc__).parse_args(argv)))
    # derived values, right after parsing
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.only = args.only or ("ours" if args.sweep else "both")
    shapes = ("tiny", *QWEN2_VL_TEXT, *QWEN3_VL, *QWEN3_5)
    assert args.shape in shapes, f"--shape {args.shape}: choose {', '.join(shapes)}"
    assert args.device in ("cpu", "cuda"), f"--device {args.device}: choose cpu or cuda"
    assert args.device == "cpu" or torch.cuda.is_available(), "--device cuda: no CUDA device here"
    assert args.only in ("ours", "baseline", "both"), f"--only {args.only}: choose ours, baseline or both"
    assert args.policy_pass in ("packed", "per_completion"), f"--policy_pass {args.policy_pass}: choose packed or per_completion"
    assert args.layers >= 0 and (args.layers == 0 or args.shape != "tiny"), "--layers N: N >= 0, for a non-tiny --shape"
    assert not args.check_memory or (args.memory and args.layers), "--check_memory: with --memory N and --layers L (a CPU-sized model)"
    assert args.num_generations >= 2, "GRPO needs at least 2 completions per prompt"
    assert not (args.sweep and args.temporal_contrast), "--temporal_contrast: without --sweep (one measurement)"
    assert not args.dynamic_sampling or (args.only != "baseline" and not args.sweep), "--dynamic_sampling: ours, without --sweep"
    assert min(args.frames, args.completion_tokens, args.prompts, args.repeats) >= 1, "counts must be at least 1"
    assert args.compile_rollout in ("auto", "on", "off"), f"--compile_rollout {args.compile_rollout}: choose auto, on or off"
    args.decodes = DECODES if args.decode == "on" else () if args.decode == "off" else tuple(args.decode.split(","))
    assert set(args.decodes) <= set(DECODES) and args.decode_tokens >= 0, f"--decode on|off or paths of {DECODES}, --decode_tokens >= 0"
    assert args.tiny_model in tiny.TINY_MODELS, f"--tiny_model {args.tiny_model}: choose one of {list(tiny.TINY_MODELS)}"
    args.decode_tokens = args.decode_tokens or args.completion_tokens
    assert args.decode == "off" or args.decode_tokens >= 3, "--decode_tokens: at least 3 (the per-step profile differences two lengths)"
    for name in ("gradient_checkpointing", "optimizer"):
        assert getattr(args, name) in ("on", "off", "auto"), f"--{name}: choose on, off or auto"
    if args.gradient_checkpointing == "auto":
        args.gradient_checkpointing = "off" if args.shape == "tiny" else "on"
    return args


# ----------------------------------------------------------------------------------------------------------------
# the model: Qwen2-VL-2B/7B-Instruct's architecture from their published config.json values, random weights

QWEN2_VL_TEXT = {
    "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),  # 7B's vocabulary is the larger one
    # Qwen2.5-VL-3B/7B-Instruct (../shared/qwen/Qwen2.5-VL-*/config.json); 7B's language model is Qwen2-VL-7B's
    "2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
QWEN2_VL_TEXT_COMMON = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, use_sliding_window=False,
                            max_window_layers=28, attention_dropout=0.0, initializer_range=0.02)
# the vision tower is the same for both: a 32-block ViT, 665M (2B) or 676M (7B) parameters with its merger into the LLM
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu", in_channels=3,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# Qwen2.5-VL's vision tower (3B and 7B alike): RMSNorm, SwiGLU MLP, window attention (112 px windows) except in 4 blocks
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                         in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
# Qwen3-VL-2B/4B/8B-Instruct (../shared/qwen/Qwen3-VL-*/config.json): (text, vision); QK-norm and interleaved M-RoPE
# in every one, DeepStack taps after three vision blocks, 8B's LM head untied
QWEN3_VL_TEXT_COMMON = dict(head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
                            rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                            rope_theta=5000000, vocab_size=151936, attention_bias=False, initializer_range=0.02)
QWEN3_VL_VISION_COMMON = dict(hidden_act="gelu_pytorch_tanh", in_channels=3, num_heads=16, num_position_embeddings=2304,
                              patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
QWEN3_VL = {
    "qwen3-vl-2b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, tie_word_embeddings=True),
                    dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-4b": (dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
                    dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-8b": (dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
                    dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24])),
}
# Qwen3.5-2B: ASSUMED sizes (no published config.json copy was found offline; docs/models.md lists each field and where
# it comes from): Qwen3-VL-2B's tower without DeepStack, a 24-layer hybrid text stack (full_attention_interval 4: 18
# Gated DeltaNet layers, 6 gated full-attention ones), head_dim 256 with partial rotary 0.25, the 248,320-id vocabulary
QWEN3_5 = {
    "qwen3.5-2b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                        full_attention_interval=4, vocab_size=248320, tie_word_embeddings=True, hidden_act="silu",
                        max_position_embeddings=262144, rms_norm_eps=1e-6, initializer_range=0.02,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                                         "mrope_section": [11, 11, 10], "mrope_interleaved": True}),
                   dict(depth=24, hidden_size=1024, intermediate_size=4096, hidden_act="gelu_pytorch_tanh", in_channels=3,
                        num_heads=16, num_position_embeddings=2304, patch_size=16, spatial_merge_size=2, temporal_patch_size=2)),
}
# dense bf16 peak TFLOP/s by device name (first match wins); other GPUs: --peak_tflops
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def qwen2_vl_config(shape, tokenizer, layers=0):
    """Qwen2VLConfig of Qwen2-VL-2B/7B-Instruct (Qwen2_5_VLConfig of Qwen2.5-VL-3B/7B-Instruct for shape 2.5-*), its
    special ids replaced by the tokenizer's (all inside the vocabulary); layers > 0 keeps that many decoder layers and
    vision blocks (Qwen2.5-VL: the last kept block with full attention, the others windowed)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    text = dict(QWEN2_VL_TEXT[shape], **QWEN2_VL_TEXT_COMMON, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if shape.startswith("2.5-"):
        config_class = Qwen2_5_VLConfig
        vision = dict(QWEN2_5_VL_VISION, out_hidden_size=text["hidden_size"])
        text.update(max_position_embeddings=128000)
    else:
        config_class = Qwen2VLConfig
        vision = dict(QWEN2_VL_VISION, hidden_size=text["hidden_size"])
    if layers:
        text.update(num_hidden_layers=layers, max_window_layers=layers)
        vision.update(depth=layers)
        if "fullatt_block_indexes" in vision:
            vision.update(fullatt_block_indexes=[i for i in vision["fullatt_block_indexes"] if i < layers] or [layers - 1])
    assert max(ids.values()) < text["vocab_size"], "special token ids must lie inside the model's vocabulary"
    return config_class(text_config=text, vision_config=vision,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                         tie_word_embeddings=text["tie_word_embeddings"])


def qwen3_vl_config(shape, tokenizer, layers=0):
    """Qwen3VLConfig of Qwen3-VL-2B/4B/8B-Instruct, special ids the tokenizer's; layers > 0 keeps that many decoder layers
    and vision blocks (DeepStack: the taps inside them, else the last kept block)."""
    from transformers import Qwen3VLConfig
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    text, vision = QWEN3_VL[shape]
    text = dict(text, **QWEN3_VL_TEXT_COMMON, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(vision, **QWEN3_VL_VISION_COMMON, out_hidden_size=text["hidden_size"])
    if layers:
        text.update(num_hidden_layers=layers)
        vision.update(depth=layers, deepstack_visual_indexes=[i for i in vision["deepstack_visual_indexes"] if i < layers] or [layers - 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=text["tie_word_embeddings"])


def qwen3_5_config(shape, tokenizer, layers=0):
    """Qwen3_5Config of QWEN3_5's (assumed) sizes, special ids the tokenizer's; layers > 0 keeps that many decoder layers
    (the first ones: 3 of every 4 linear attention) and vision blocks."""
    from transformers import Qwen3_5Config
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    text, vision = QWEN3_5[shape]
    text = dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(vision, out_hidden_size=text["hidden_size"])
    if layers:
        text.update(num_hidden_layers=layers)
        vision.update(depth=layers)
    return Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=text["tie_word_embeddings"])


def build_model(shape, tokenizer, device, dtype, vision_attn, layers=0, tiny_family="qwen2_vl"):
    """The tiny model of tiny.py, or a random Qwen2-VL-2B/7B built directly on the device in its dtype; attention as
    load_model's (packed_attention for the language model, `vision_attn` for the vision tower)."""
    from transformers import AutoModelForImageTextToText
    attn = {"text_config": "sdpa", "vision_config": vision_attn}
    if shape == "tiny":
        model = tiny.build_tiny_model(tokenizer, family=tiny_family).to(device=device, dtype=dtype)
        model.set_attn_implementation(attn)
    else:
        with torch.device(device):  # initialise on the GPU: a 7B init on CPU takes minutes
            family_config = qwen3_vl_config if shape in QWEN3_VL else qwen3_5_config if shape in QWEN3_5 else qwen2_vl_config
            config = family_config(shape, tokenizer, layers)
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype,
                                                            attn_implementation=attn)
    return use_packed_attention(model)


def parameter_counts(model):
    """{vision, merger, embed, head, body}: the vision tower without its merger, the merger, the input embedding,
    the LM head (0 when tied to the embedding) and the rest of the decoder."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    embed = model.get_input_embeddings().weight
    merger = count(model.model.visual.merger)
    vision = count(model.model.visual) - merger
    head = 0 if model.lm_head.weight is embed else model.lm_head.weight.numel()
    total = count(model)
    return {"vision": vision, "merger": merger, "embed": embed.numel(), "head": head,
            "body": total - vision - merger - embed.numel() - head, "total": total}


def forward_flops(counts, d_model, vocab, *, B, G, P, C, n_patches):
    """FLOPs of one log-prob pass forward as the step needs it (2 per multiply-add): vision tower once per video,
    decoder body at all B*G*(P+C) positions, LM head at the C completion positions (ours takes C+1 logits)."""
    return 2 * (counts["vision"] * n_patches + counts["merger"] * n_patches // 4
                + counts["body"] * B * G * (P + C) + d_model * vocab * B * G * C)


def memory_per_gpu(model, *, world, lora_rank, B, G, P, C, bytes_per=2, decode_caches=1):
    """GiB per GPU of a train.py step under ZeRO-3 on `world` GPUs, bf16, computed from the shapes (model may be on the
    meta device): sharded weights (policy, and the reference unless LoRA), gradients and fp32 AdamW states (master,
    m, v) of what trains, the full weights gathered for the rollout, the rollout's KV cache for B*G rows of P+C tokens,
    the policy pass's logits at the B*G*C completion positions (bf16, kept for selective_log_softmax's backward) with
    their gradient and one fp32 row, its activations under gradient checkpointing (each layer's input over B*(P+G*C)
    packed positions, plus one layer recomputed), and the (vocabulary x width) weight gradient of the LM head and the
    input embedding as autograd forms it, whole, before ZeRO shards it: one at a time when untied; tied (2B), autograd
    holds the LM head's part until the embedding's arrives and adds the two into a third (check_memory measures it).
    The compiled rollout (the default on GPU) keeps `decode_caches` static KV caches alive between steps, one per decode
    shape (decode.static_cache: 1 when every batch has one shape, at most decode.COMPILED_SHAPES_MAX), each of this step's
    shape padded: rows to 2^k, width to 256 x 2^k (decode.decode_shape); 0 for --compile_rollout off."""
    text = model.config.text_config
    N = sum(p.numel() for p in model.parameters())
    d, inter, layers, V = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads  # Qwen3-VL-4B: 128, not 2560/32
    kv = text.num_key_value_heads * head_dim
    # LoRA on the default targets (model.lora_targets: q/k/v/o/gate/up/down; Qwen3.5 also in_proj_qkv/z, out_proj; its
    # q_proj is 2x wide, with the output gate): r * (in + out) per projection
    targets = set(lora_targets(model, "")) if lora_rank else set()
    adapter = lora_rank * sum(m.in_features + m.out_features for n, m in hf_model(model).named_modules() if n in targets)
    # Qwen3.5: a KV cache in the full-attention layers only; each Gated DeltaNet layer holds a conv state (conv_dim x
    # kernel, bf16) and an fp32 recurrent state (value heads x d_k x d_v) per row, whatever the length
    full = sum(t == "full_attention" for t in getattr(text, "layer_types", None) or ["full_attention"] * layers)
    lin = lambda name: getattr(text, "linear_" + name, 0)  # the Gated DeltaNet's sizes; 0 in the other families
    conv_dim = 2 * lin("num_key_heads") * lin("key_head_dim") + lin("num_value_heads") * lin("value_head_dim")
    linear_state = (layers - full) * (conv_dim * lin("conv_kernel_dim") * bytes_per
                                      + lin("num_value_heads") * lin("key_head_dim") * lin("value_head_dim") * 4)
    trained = adapter or N
    gib = lambda x: x / 2**30
    positions = B * (P + G * C)
    rows, width = decode_shape(B * G, P + C)
    return {
        "weights (policy + reference), sharded": gib(bytes_per * (N * (1 if lora_rank else 2) + adapter) / world),
        "gradients, sharded": gib(bytes_per * trained / world),
        "AdamW fp32 master + m + v, sharded": gib(12 * trained / world),
        "weights gathered for the rollout": gib(bytes_per * (N + adapter)),
        "KV cache (rollout)": gib(full * 2 * kv * bytes_per * B * G * (P + C) + linear_state * B * G),
        # a hybrid family (Qwen3.5) decodes eagerly (model.sample_completions): no static cache kept
        "static KV caches kept (compiled rollout)": gib((decode_caches if full == layers else 0) * layers * 2 * kv * bytes_per * rows * width),
        "logits and their gradient (policy pass)": gib(2 * B * G * C * V * bytes_per + C * V * 4),
        "activations (policy pass, checkpointed)": gib(positions * d * bytes_per * layers + positions * (6 * d + 3 * inter) * bytes_per),
        "LM head / embedding weight gradient, whole": gib((0 if lora_rank else 3 if tied(model) else 1) * V * d * bytes_per),
        "trainable parameters": trained,
    }


def tied(model):
    """Whether the LM head is the input embedding's weight (Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B/4B)."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def policy_pass_peak(model, terms):
    """The policy pass's peak from memory_per_gpu's terms (GiB), which do not all coexist: the activations, plus the
    largest of the logits with their gradient (selective_log_softmax's backward), the gradient of the logits beside
    one whole weight gradient (the LM head's backward), and all the whole weight gradients (tied: the embedding's
    backward, last, three at once)."""
    logits, weight_grads = terms["logits and their gradient (policy pass)"], terms["LM head / embedding weight gradient, whole"]
    one = weight_grads / 3 if tied(model) else weight_grads
    return terms["activations (policy pass, checkpointed)"] + max(logits, logits / 2 + one, weight_grads)


def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def peak_memory_during(fn):
    """(fn(), bytes): the peak of the process's anonymous memory during fn above its level before, sampled every 2 ms
    by a thread."""
    import threading
    base, peak, done = rss_anon(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    return out, max(peak[0], rss_anon()) - base


def check_memory(args):
    """--check_memory: memory_per_gpu's terms that one process allocates, measured on CPU in bf16 at --layers, beside
    the estimate for the same shapes on one GPU. The KV cache: the bytes of the static cache the rollout decodes on
    (P + C positions, B*G rows). The policy pass (completion_logps, the GRPO loss, backward; gradient checkpointing
    on): the peak above the level before it, the parameters' gradients allocated by a first pass (their own term),
    against policy_pass_peak. Returns {term: (estimate, measured)}, GiB."""
    import ctypes
    # glibc maps every allocation over 64 KiB on its own from now on (mallopt M_MMAP_THRESHOLD), so a freed tensor
    # leaves the process at once: the measured peaks are of live tensors, not of what the allocator keeps
    ctypes.CDLL(None).mallopt(-3, 64 * 1024)
    torch.manual_seed(args.seed)
    tokenizer = tiny.build_tiny_tokenizer()
    model = build_model(args.shape, tokenizer, torch.device("cpu"), torch.bfloat16, "sdpa", args.layers)
    checkpoint_activations(model)  # = train.py's
    batch = build_batch(tokenizer, frames=args.frames, prompts=args.prompts, device="cpu", seed=args.seed,
                        model_type=model.config.model_type)
    (B, P), G, C = batch["input_ids"].shape, args.num_generations, args.completion_tokens
    terms = memory_per_gpu(model, world=1, lora_rank=0, B=B, G=G, P=P, C=C)
    eos, vision = special_token_ids(tokenizer)
    model.eval()  # as train.py's rollout
    with torch.no_grad():
        cache = prefill(model, batch, G)[0]  # B*G rows of P positions; the static cache's P + C, before rounding
        kv_cache = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)) * (P + C) / P
        del cache
        completion_ids = sample_completions(model, batch, num_generations=G, max_new_tokens=C, temperature=1.0,
                                            eos_token_ids=eos, suppress_token_ids=vision + eos,
                                            pad_token_id=tokenizer.pad_token_id)               # (B*G, C), no EOS
    model.train()
    ref_logps, advantages = torch.zeros(B * G, C), torch.randn(B * G)
    def policy_pass():
        logps = completion_logps(model, batch, completion_ids, num_generations=G, temperature=1.0)  # (B*G, C)
        loss, _ = train.grpo_loss(logps, None, ref_logps, advantages, torch.ones(B * G, C),
                                  train.LossSettings(max_completion_length=C))
        loss.backward()
    policy_pass()  # allocates the gradients; the measured pass accumulates into them
    model.zero_grad(set_to_none=False)
    _, policy_peak = peak_memory_during(policy_pass)
    return {"KV cache (rollout)": (terms["KV cache (rollout)"], kv_cache / 2**30),
            "policy pass peak": (policy_pass_peak(model, terms), policy_peak / 2**30)}


# ----------------------------------------------------------------------------------------------------------------
# the inputs: B prompts with a random video at Video-R1's first trainer's size

def video_settings(model_type):
    """data.VideoSettings of the family: Qwen3-VL's 16-px patches, mean/std 0.5 and frame timestamps, else the defaults."""
    if model_type in data.TIMESTAMPED:  # Qwen3-VL, Qwen3.5
        return data.VideoSettings(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, frame_timestamps=True)
    return data.VideoSettings()


def image_prompt_tokens(tokenizer, model_type="qwen2_vl", image_max_pixels=0):
    """Tokens of the longest image row's prompt (train.py --image_max_pixels; 0: 256 merged patches): a square image
    at that area (its side floored to merged patches), the image block expanded as data.py does."""
    s = dataclasses.replace(video_settings(model_type), image_max_pixels=image_max_pixels)
    side = math.isqrt(s.image_max_pixels // s.factor ** 2) * s.merge_size  # patches a side
    text = data.build_prompt_text(tokenizer, "How many red objects are in the image?", data_type="image")
    return len(data.encode_prompt(tokenizer, text, torch.tensor([[1, side, side]]), s.merge_size, data_type="image")[0])


def build_batch(tokenizer, *, frames, prompts, device, seed, height=240, width=320, shuffled=False, model_type="qwen2_vl"):
    """B random uint8 videos of `frames` frames, smart-resized as Video-R1's first trainer's DVD clips, patched and prompted as in data.py;
    shuffled=True adds T-GRPO's copy with the frames in random order (as data.VideoPromptDataset(shuffled_frames=True))."""
    s = video_settings(model_type)
    pixels = 128 * s.factor ** 2
    h, w = vision.smart_resize(height, width, s.factor, min_pixels=pixels, max_pixels=pixels)  # 240x320 -> 280x392 (Qwen3-VL: 320x448)
    rng = np.random.default_rng(seed)
    text = data.build_prompt_text(tokenizer, "How many red objects are in the video?")
    # Qwen3-VL's prompt times each frame pair: 2 fps from a 24-fps clip
    timestamps = data.video_timestamps(list(range(0, 12 * frames, 12)), 24.0) if s.frame_timestamps else None
    items = []
    for i in range(prompts):
        video = rng.integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)   # (T, H, W, 3)
        patch = lambda v: vision.video_to_patches(v, s.patch_size, s.temporal_patch_size, s.merge_size, s.image_mean, s.image_std)
        pixel_values, grid = patch(video)                                      # (t*h*w patches, 1176 or 1536), (1, 3)
        input_ids, types = data.encode_prompt(tokenizer, text, grid, timestamps=timestamps)
        items.append({"input_ids": input_ids, "mm_token_type_ids": types, "pixel_values_videos": pixel_values,
                      "video_grid_thw": grid, "second_per_grid_ts": torch.tensor([1.0]),  # 2 frames per patch at 2 fps
                      "problem": "", "solution": "", "video": f"random{i}", "index": i})
        if shuffled:
            items[-1]["pixel_values_videos_shuffled"] = patch(video[data.frame_permutation(frames, seed + i).numpy()])[0]
    batch = data.collate(items, pad_token_id=tokenizer.pad_token_id)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Video-R1's first trainer's way (the baseline): new code only here; "ours" is train.py's own functions

@torch.no_grad()
def baseline_rollout(model, batch, *, num_generations, max_new_tokens, eos_token_ids, suppress_token_ids, pad_token_id):
    """Video-R1's first trainer's rollout: G separate `generate` calls, each encoding the video and prefilling the prompt again
    (sampling with generate's default top_k=50, as Video-R1's first trainer's GenerationConfig). Returns (B*G, C) ordered prompt by
    prompt, as sample_completions. Timed only (its positions are transformers' own; nothing trains on its tokens)."""
    P = batch["input_ids"].size(1)
    runs = [model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           mm_token_type_ids=batch["mm_token_type_ids"], pixel_values_videos=batch["pixel_values_videos"],
                           video_grid_thw=batch["video_grid_thw"], **position_inputs(model, batch), do_sample=True, temperature=1.0,
                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, suppress_tokens=suppress_token_ids,
                           eos_token_id=eos_token_ids, pad_token_id=pad_token_id)[:, P:]
            for _ in range(num_generations)]                                          # G x (B, C)
    return torch.stack(runs, dim=1).flatten(0, 1)                                     # (B*G, C)


def baseline_logps(model, batch, completion_ids, *, num_generations):
    """Video-R1's first trainer's log-probs: the video repeated G times, full-vocabulary logits over the whole sequence, log-softmax at
    every position one row at a time, then the completion slice. (B*G, C) -> (B*G, C); grad flows if enabled."""
    G, C = num_generations, completion_ids.size(1)
    videos = torch.split(batch["pixel_values_videos"], batch["video_grid_thw"].prod(-1).tolist())
    input_ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), completion_ids], 1)           # (B*G, P+C)
    # positions by the family's rule (Video-R1's first trainer's transformers 4.49 had Qwen2.5-VL's release rule; 5.23 differs)
    positions, next_pos = prompt_positions(model, batch)                                             # (3, B, P), (B,)
    completion_pos = (next_pos[:, None] + torch.arange(C, device=next_pos.device))[None].expand(3, -1, -1)  # (3, B, C)
    out = model(input_ids=input_ids, position_ids=torch.cat([positions, completion_pos], 2).repeat_interleave(G, 1),
                attention_mask=torch.cat([batch["attention_mask"].repeat_interleave(G, 0), torch.ones_like(completion_ids)], 1),
                mm_token_type_ids=torch.cat([batch["mm_token_type_ids"].repeat_interleave(G, 0), torch.zeros_like(completion_ids)], 1),
                pixel_values_videos=torch.cat([v for v in videos for _ in range(G)]),               # (B*G*n, 1176)
                video_grid_thw=batch["video_grid_thw"].repeat_interleave(G, 0), use_cache=False,
                **{k: v.repeat_interleave(G, 0) for k, v in position_inputs(model, batch).items()})
    logits, targets = out.logits[:, :-1], input_ids[:, 1:]                                           # (B*G, P+C-1, V)
    logps = torch.stack([row.float().log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1) for row, ids in zip(logits, targets)])
    return logps[:, -C:]                                                                             # (B*G, C)


def per_completion_logps(model, batch, completion_ids, *, num_generations, temperature, entropy=False):
    """completion_logps as it was before packing (--policy_pass per_completion, in place of it in train.policy_update):
    video encoded once and logits only at completion positions, but the prompt run again for each completion,
    B*G*(P+C) positions. (B*G, C)"""
    assert not entropy, "per_completion_logps: log-probs only (train.py's default --top_entropy_quantile 1.0)"
    G, C = num_generations, completion_ids.size(1)
    positions, next_pos = prompt_positions(model, batch)                        # (3, B, P), (B,)
    completion_pos = next_pos[:, None] + torch.arange(C, device=next_pos.device)      # (B, C)
    positions = torch.cat([positions, completion_pos[None].expand(3, -1, -1)], dim=2).repeat_interleave(G, dim=1)
    input_ids = torch.cat([batch["input_ids"].repeat_interleave(G, dim=0), completion_ids], dim=1)  # (B*G, P+C)
    attention_mask = torch.cat([batch["attention_mask"].repeat_interleave(G, dim=0), torch.ones_like(completion_ids)], dim=1)
    video = vision_features(model, batch)["video"]                               # vision tower once per video
    video.pooler_output = tuple(f for f in video.pooler_output for _ in range(G))     # the same features for G rows
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                mm_encoder_outputs={"video": video}, use_cache=False, logits_to_keep=C + 1)
    return selective_log_softmax(out.logits[:, :-1], completion_ids, temperature)  # (B*G, C)


# ----------------------------------------------------------------------------------------------------------------
# timing

def max_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def available_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def timed(fn, device):
    """(fn(), (seconds, GiB)): GiB is the peak allocated during fn on CUDA, the process's max RSS so far on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return out, (seconds, peak_gib(device))


def peak_gib(device):
    """GiB allocated at the peak since the last reset on CUDA; the process's max RSS so far on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else max_rss_gib()


# ----------------------------------------------------------------------------------------------------------------
# one step, phase by phase: ours is train.py's own step functions, on a train.Run of this one process

class PlainEngine:
    """What train.py's step calls on its DeepSpeed engine, for one process without ZeRO: backward; step = clip the
    gradient norm at 20 (train.py's max_grad_norm, applied by DeepSpeed there), torch AdamW, zero the gradients, timed
    apart (the optimizer phase); the grad norm. It also stands in for the reference's engine: the reference pass runs
    on the policy's weights (docstring, 2)."""

    def __init__(self, model, optimizer, device):
        self.module, self.optimizer, self.device = model, optimizer, device
        self.grad_norm, self.last_step = None, None

    def zero_optimization_stage(self):
        return 0  # model.gathered_params: nothing to gather

    def backward(self, loss):
        loss.backward()

    def update(self):
        if self.optimizer is None:  # --optimizer off: the gradients go, no update
            self.module.zero_grad(set_to_none=True)
            return
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 20.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self):
        before = peak_gib(self.device)  # the policy pass's peak, before timed() resets it for the update's own
        _, (seconds, mem) = timed(self.update, self.device)
        self.last_step = seconds, mem, before

    def get_global_grad_norm(self):
        return self.grad_norm


def step_run(model, optimizer, tokenizer, batch, *, G, C, eos, never, compile_rollout, tgrpo, **_):
    """A train.Run with what train.rollout, reference_logps and policy_update read: train.py's defaults at this
    shape (so its sampling: top_k 50, as the baseline's generate), EOS never sampled (docstring, 1), T-GRPO's rollout for
    way "tgrpo" (G // 2 completions per shuffled video). What only setup, scoring or the loop read is left out."""
    cfg = train.Config(num_generations=G, max_completion_length=C, prompts_per_device=batch["input_ids"].size(0),
                       compile_rollout=compile_rollout, temporal_contrast=tgrpo)
    engine = PlainEngine(model, optimizer, batch["input_ids"].device)
    return train.Run(cfg=cfg, rank=0, world=1, device=engine.device, tokenizer=tokenizer, engine=engine, ref_engine=engine,
                     scheduler=None, model_dir=None, reward_names=[], reward_funcs=[], reward_weights=[],
                     accuracy_reward=None, G_shuffled=G // 2, eos_token_ids=eos, suppress=never,
                     batches=None, skips=None, logger=None, start_step=0, total_steps=0, steps_per_epoch=0)


@contextlib.contextmanager
def one_process_group():
    """train.py's step all-reduces (a non-finite loss on any rank skips the update on all): a group of this process
    alone (gloo: CPU and CUDA tensors), unless one is up; closed after."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def ours_step(run, batch, policy_pass="packed"):
    """One GRPO step by train.py's own functions: train.rollout, train.reference_logps, train.policy_update (its
    engine's step timed apart: the optimizer phase, only with an optimizer). Returns {phase: (seconds, GiB)}.
    --policy_pass per_completion: the policy pass as it was before packing (per_completion_logps) in its place."""
    B, G, C, device, result = len(batch["solution"]), run.cfg.num_generations, run.cfg.max_completion_length, run.device, {}
    (completion_ids, _), result["rollout"] = timed(lambda: train.rollout(run, batch), device)  # (B*G, C)
    assert completion_ids.shape == (B * G, C), f"completions {tuple(completion_ids.shape)}, expected {(B * G, C)}"
    mask = model_lib.completion_mask(completion_ids, run.eos_token_ids)             # (B*G, C): all ones, EOS never sampled
    advantages = torch.randn(B * G, device=device)                                     # rewards do not change the cost
    ref_logps, result["ref_logps"] = timed(lambda: train.reference_logps(run, batch, completion_ids), device)  # (B*G, C)
    unpacked = mock.patch.object(model_lib, "completion_logps", per_completion_logps) if policy_pass == "per_completion" \
        else contextlib.nullcontext()
    with unpacked:
        _, (seconds, _) = timed(lambda: train.policy_update(run, batch, completion_ids, advantages, mask, ref_logps), device)
    step_s, step_mem, pass_mem = run.engine.last_step
    result["policy_fwd_bwd"] = (seconds - step_s, pass_mem)
    if run.engine.optimizer is not None:
        result["optimizer"] = (step_s, step_mem)
    return result


def baseline_step(run, batch):
    """The same step Video-R1's first trainer's way (the comparison, not a copy: its rollout and log-prob passes are baseline_rollout
    and baseline_logps), on the same Run: train.grpo_loss, backward, then the engine's update. {phase: (seconds, GiB)}"""
    model, device, G, C = run.policy, run.device, run.cfg.num_generations, run.cfg.max_completion_length
    B, result = len(batch["solution"]), {}
    model.eval()  # as train.py: eval for generation, so gradient checkpointing does not switch the KV cache off
    completion_ids, result["rollout"] = timed(lambda: baseline_rollout(
        model, batch, num_generations=G, max_new_tokens=C, eos_token_ids=run.eos_token_ids,
        suppress_token_ids=run.suppress, pad_token_id=run.tokenizer.pad_token_id), device)  # (B*G, C)
    assert completion_ids.shape == (B * G, C), f"baseline: completions {tuple(completion_ids.shape)}, expected {(B * G, C)}"
    mask = model_lib.completion_mask(completion_ids, run.eos_token_ids)             # (B*G, C)
    advantages = torch.randn(B * G, device=device)
    with torch.no_grad():  # in eval mode still, as train.py's reference pass
        ref_logps, result["ref_logps"] = timed(lambda: baseline_logps(model, batch, completion_ids, num_generations=G), device)

    def policy_pass():
        logps = baseline_logps(model, batch, completion_ids, num_generations=G)       # (B*G, C)
        loss, _ = train.grpo_loss(logps, None, ref_logps, advantages, mask, run.loss_settings)
        loss.backward()
    model.train()
    _, result["policy_fwd_bwd"] = timed(policy_pass, device)
    _, update = timed(run.engine.update, device)
    if run.engine.optimizer is not None:
        result["optimizer"] = update
    return result


def bench(way, model, optimizer, tokenizer, batch, *, G, C, repeats, step_kw):
    """One warm-up step, then `repeats` timed ones: {phase: {"time_s": median, "mem_gib": max}} plus "total"."""
    run = step_run(model, optimizer, tokenizer, batch, G=G, C=C, tgrpo=way == "tgrpo", **step_kw)
    step = baseline_step if way == "baseline" else functools.partial(ours_step, policy_pass=step_kw["policy_pass"])
    with one_process_group():
        step(run, batch)
        steps = [step(run, batch) for _ in range(repeats)]
    phases = {p: {"time_s": statistics.median(s[p][0] for s in steps), "mem_gib": max(s[p][1] for s in steps)} for p in steps[0]}
    phases["total"] = {"time_s": statistics.median(sum(t for t, _ in s.values()) for s in steps),
                       "mem_gib": max(m for s in steps for _, m in s.values())}
    return phases


# ----------------------------------------------------------------------------------------------------------------
# one measurement: both ways on one batch, with throughput and MFU

def measure(model, optimizer, tokenizer, args, device, *, frames, G, step_kw, counts, peak_flops):
    B, C = args.prompts, args.completion_tokens
    batch = build_batch(tokenizer, frames=frames, prompts=B, device=device, seed=args.seed, shuffled=args.temporal_contrast,
                        model_type=model.config.model_type)
    P = batch["input_ids"].size(1)
    n_patches = batch["pixel_values_videos"].size(0)
    fwd = forward_flops(counts, model.config.text_config.hidden_size, model.config.text_config.vocab_size,
                        B=B, G=G, P=P, C=C, n_patches=n_patches)
    flops = {"ref_logps": fwd, "policy_fwd_bwd": 3 * fwd}  # backward = 2x forward
    row = {"frames": frames, "num_generations": G, "video_grid": batch["video_grid_thw"][0].tolist(),
           "video_tokens": n_patches // (4 * B), "prompt_tokens": P, "sequence_tokens": P + C}
    ways = ["ours", "baseline"] if args.only == "both" else [args.only]
    if args.temporal_contrast:
        ways = list(dict.fromkeys(["ours", "tgrpo", *ways]))
    for way in ways:
        torch.manual_seed(args.seed)
        phases = bench(way, model, optimizer, tokenizer, batch, G=G, C=C, repeats=args.repeats, step_kw=step_kw)
        phases["rollout"]["tokens_per_s"] = B * G * C / phases["rollout"]["time_s"]
        for p, f in flops.items():
            phases[p]["tokens_per_s"] = B * G * (P + C) / phases[p]["time_s"]
            phases[p]["tflops"] = f / phases[p]["time_s"] / 1e12
            phases[p]["mfu"] = f / phases[p]["time_s"] / peak_flops if peak_flops else None
        row[way] = phases
    if args.only == "both":
        row["speedup"] = {p: row["baseline"][p]["time_s"] / row["ours"][p]["time_s"] for p in row["ours"]}
    if args.temporal_contrast:  # what T-GRPO adds to ours, phase by phase
        row["tgrpo_added_s"] = {p: row["tgrpo"][p]["time_s"] - row["ours"][p]["time_s"] for p in row["ours"]}
    if args.dynamic_sampling:  # an extra rollout is ours' rollout phase again; joining two batches' groups timed here
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            data.collate(data.uncollate(batch) + data.uncollate(batch), tokenizer.pad_token_id)
        row["dynamic_join_s"] = (time.perf_counter() - t0) / args.repeats
        row["dynamic_extra_rollout_s"] = row["ours"]["rollout"]["time_s"]
    return row


# ----------------------------------------------------------------------------------------------------------------
# the rollout's decode: eager (DynamicCache, one full forward per token) against the static cache, eager and compiled

DECODES = ("eager", "static", "compiled")


def profile_counts(fn, device):
    """(profiler events on the host, CUDA kernels, CUDA graph replays) while fn runs, and the host events' table, top 15
    by self time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    launches = sum(1 for e in events if e.name == "cudaGraphLaunch")
    return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU), kernels, launches, table


def measure_decode(model, batch, *, G, C, eos, never, pad_token_id, device, repeats, decodes=DECODES, **_):
    """Prefill seconds (vision + prompt, the KV cache repeated G times) and, per decode path, milliseconds per decode
    step, token choice included: (median rollout of C tokens - median rollout of C // 2) / (C - C // 2), so prefill
    and setup cancel; the compiled path's first call (its compilation) is timed apart as compile_s. Ops per step: the
    profiler's events in a rollout of C tokens minus one of C - 1 (host events; on CUDA also the kernels launched)."""
    kw = dict(num_generations=G, temperature=1.0, eos_token_ids=eos, suppress_token_ids=never, pad_token_id=pad_token_id)
    model.eval()
    with torch.no_grad():
        prefill_s = statistics.median(timed(lambda: prefill(model, batch, G), device)[1][0] for _ in range(repeats))
    result, tables = {"prefill_s": prefill_s, "decode_tokens": C}, {}
    for decode in decodes:
        rollout = lambda n: sample_completions(model, batch, max_new_tokens=n, decode=decode, **kw)
        first = timed(lambda: rollout(C), device)[1][0]
        rollout(C // 2)  # one compiled graph serves every length within a cache bucket; warm both
        seconds, half = (statistics.median(timed(lambda: rollout(n), device)[1][0] for _ in range(repeats)) for n in (C, C // 2))
        result[f"decode_ms_per_token_{decode}"] = 1000 * (seconds - half) / (C - C // 2)
        if decode == "compiled":
            result["compile_s"] = first - seconds
        (ops, kernels, launches, tables[decode]), (ops_short, kernels_short, launches_short, _) = (
            profile_counts(lambda: rollout(n), device) for n in (C, C - 1))
        result[f"ops_per_token_{decode}"] = ops - ops_short
        result[f"kernels_per_token_{decode}"] = kernels - kernels_short if device.type == "cuda" else None
        result[f"graph_replays_per_token_{decode}"] = launches - launches_short if device.type == "cuda" else None
    if "compiled" in decodes:  # what the compiled decode keeps: static caches, shapes, CUDA graphs (bounded, decode.py)
        from torch._dynamo.utils import counters
        result.update(decode_state(device), cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    ids = sample_completions(model, batch, max_new_tokens=C, greedy=True, **kw)                   # (B*G, C)
    result["ops_reference_pass"] = profile_counts(lambda: completion_logps_shared_prompt(  # one batched pass, no loop
        model, batch, ids, num_generations=G, temperature=1.0), device)[0]
    if "compiled" in decodes:
        result["decode_speedup"] = result["decode_ms_per_token_eager"] / result["decode_ms_per_token_compiled"]
    return result, tables


# ----------------------------------------------------------------------------------------------------------------
# reporting

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(row, mem_label):
    ways = [w for w in ("ours", "tgrpo", "baseline") if w in row]
    print(f"{'phase':<16}{'way':<10}{'time_s':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{mem_label:>16}")
    for phase in row[ways[0]]:
        for way in ways:
            r = row[way][phase]
            mfu = None if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            print(f"{phase if way == ways[0] else '':<16}{way:<10}{r['time_s']:>10.3f}{fmt(r.get('tokens_per_s'), '.1f'):>12}"
                  f"{fmt(r.get('tflops'), '.3f'):>10}{fmt(mfu, ''):>8}{r['mem_gib']:>16.2f}")
        if "speedup" in row:
            print(f"{'':<16}{'speedup':<10}{row['speedup'][phase]:>9.2f}x")


def print_decode(d):
    print(f"decode ({d['decode_tokens']} tokens; prefill {d['prefill_s']:.3f}s):")
    print(f"{'path':<12}{'ms/token':>10}{'ops/token':>11}{'kernels/token':>15}")
    for decode in [p for p in DECODES if f"ops_per_token_{p}" in d]:
        print(f"{decode:<12}{d[f'decode_ms_per_token_{decode}']:>10.2f}{d[f'ops_per_token_{decode}']:>11}"
              f"{fmt(d[f'kernels_per_token_{decode}'], ''):>15}")
    if "decode_speedup" in d:
        print(f"compiled decode {d['decode_speedup']:.2f}x eager per token; compile {d['compile_s']:.1f}s (once per shape)")
        print(f"kept: static caches {d['decode_caches']}, shapes {d['decode_shapes']}, CUDA graphs {fmt(d['cuda_graphs'], '')} "
              f"({fmt(d['graph_replays_per_token_compiled'], '')} replays a token), cudagraph skips {d['cudagraph_skips']}")
    print(f"the reference pass on these completions: {d['ops_reference_pass']} ops in all (eager, one batched forward)")


def print_sweep(rows):
    ways = [w for w in ("ours", "baseline") if w in rows[0]]
    head = f"{'frames':>6}{'G':>4}{'video_tok':>10}{'seq_len':>8}"
    for way in ways:
        head += "".join(f"{way[:4] + ' ' + p:>15}" for p in ("rollout", "ref", "fwd_bwd", "opt", "total"))
    print(head + (f"{'speedup':>9}" if "speedup" in rows[0] else ""))
    for row in rows:
        line = f"{row['frames']:>6}{row['num_generations']:>4}{row['video_tokens']:>10}{row['sequence_tokens']:>8}"
        for way in ways:
            for p in ("rollout", "ref_logps", "policy_fwd_bwd", "optimizer", "total"):
                line += f"{fmt(row[way].get(p, {}).get('time_s'), '.3f'):>15}"
        print(line + (f"{row['speedup']['total']:>8.2f}x" if "speedup" in row else ""))


# ----------------------------------------------------------------------------------------------------------------
# main

def memory_table(args):
    """--memory: the per-GPU estimate, full and LoRA, from the shapes on the meta device (nothing allocated)."""
    model = build_model(args.shape, tiny.build_tiny_tokenizer(), torch.device("meta"), torch.bfloat16, "sdpa", args.layers)
    P_video = build_batch(tiny.build_tiny_tokenizer(), frames=args.frames, prompts=1, device="cpu", seed=0,
                          model_type=model.config.model_type)["input_ids"].size(1)  # Video-R1's first trainer's 280x392 frames (Qwen3-VL: 320x448)
    P_image = image_prompt_tokens(tiny.build_tiny_tokenizer(), model.config.model_type, args.image_max_pixels)
    P = max(P_video, P_image)  # a run's rows are videos or images: the longer prompt decides the peak
    kw = dict(world=args.memory, B=args.prompts, G=args.num_generations, P=P, C=args.completion_tokens)
    full, lora = memory_per_gpu(model, lora_rank=0, **kw), memory_per_gpu(model, lora_rank=args.lora_rank, **kw)
    print(f"{args.shape}, {args.memory} GPUs, ZeRO-3 bf16, B={args.prompts} G={args.num_generations} prompt {P} "
          f"(video row {P_video}, image row {P_image}) + completion {args.completion_tokens} tokens: GiB per GPU | full | LoRA r={args.lora_rank}")
    for key in full:
        print(f"| {key} | {full[key]:,.2f} | {lora[key]:,.2f} |" if key != "trainable parameters" else
              f"| {key} | {full[key] / 1e9:.2f}B | {lora[key] / 1e6:.1f}M |")
    total = lambda m: sum(v for k, v in m.items() if k != "trainable parameters")
    print(f"| total | {total(full):,.1f} | {total(lora):,.1f} |")
    print(f"| policy pass peak (of its three terms) | {policy_pass_peak(model, full):,.2f} | {policy_pass_peak(model, lora):,.2f} |")
    result = {"full": full, "lora": lora}
    if args.check_memory:
        result["check"] = check_memory(args)
        print(f"measured on CPU, bf16, {args.layers} layers, one process: GiB | estimate | measured")
        for key, (estimate, measured) in result["check"].items():
            print(f"| {key} | {estimate:.3f} | {measured:.3f} |")
    return result


def build(args, device, dtype, attn):
    """The tokenizer and the model, refused early where its weights cannot fit (7b in fp32 on a 24 GB machine), and
    the seconds the build took."""
    approx_params = {"tiny": 1e6, "2b": 2.21e9, "7b": 8.29e9, "2.5-3b": 3.75e9, "2.5-7b": 8.29e9,
                     "qwen3-vl-2b": 2.13e9, "qwen3-vl-4b": 4.44e9, "qwen3-vl-8b": 8.77e9, "qwen3.5-2b": 2.3e9}[args.shape]
    need, free = approx_params * (torch.finfo(dtype).bits // 8), available_memory_bytes(device)
    assert args.layers or need < 0.9 * free, (f"--shape {args.shape} needs {need / 2**30:.0f} GiB "
                                              f"for its {dtype} weights alone; {free / 2**30:.0f} GiB available")
    torch.manual_seed(args.seed)
    tokenizer = tiny.build_tiny_tokenizer()
    t0 = time.perf_counter()
    model = build_model(args.shape, tokenizer, device, dtype, attn, args.layers, tiny.TINY_MODELS[args.tiny_model])
    if args.gradient_checkpointing == "on":
        checkpoint_activations(model)  # = train.py's
    return tokenizer, model, time.perf_counter() - t0


def make_optimizer(args, model, device, counts, bytes_per):
    """torch AdamW where gradients + two AdamW states, each the parameters' size, fit beside the activations
    (--optimizer auto); else None, said on stderr."""
    need, free = 3 * counts["total"] * bytes_per, available_memory_bytes(device)
    if not (args.optimizer == "on" or (args.optimizer == "auto" and need < 0.6 * free)):
        print(f"optimizer phase skipped (--optimizer {args.optimizer}): gradients + AdamW states need {need / 2**30:.1f} GiB, "
              f"{free / 2**30:.1f} GiB free after the model. The real run shards them with ZeRO-3 over 4 GPUs.", file=sys.stderr)
        return None
    if args.shape != "tiny" and device.type == "cpu":
        print(f"warning: AdamW on CPU for {args.shape} needs ~{need / 2**30:.0f} GiB more", file=sys.stderr)
    return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)


def describe(args, model, device, dtype, attn, counts, optimizer, build_s):
    """What was measured, for the JSON and the header line (printed)."""
    peak = args.peak_tflops or (next((t for name, t in PEAK_TFLOPS if name in torch.cuda.get_device_name(device)), 0.0)
                                if device.type == "cuda" else 0.0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    setup = {"shape": args.shape, "layers": args.layers or None, "device": device_name, "dtype": str(dtype).replace("torch.", ""),
             "vision_attn": attn, "policy_pass": args.policy_pass, "temporal_contrast": args.temporal_contrast,
             "gradient_checkpointing": args.gradient_checkpointing == "on", "optimizer": optimizer is not None,
             "params": counts, "prompts": args.prompts, "completion_tokens": args.completion_tokens,
             "repeats": args.repeats, "peak_tflops": peak or None, "build_s": round(build_s, 1),
             "rollout_decode": rollout_decode(args.compile_rollout, device), "load_avg_1m": round(os.getloadavg()[0], 2)}  # CPU timings from a busy machine are not comparable
    print(f"{type(model).__name__.removesuffix('ForConditionalGeneration')} {args.shape}{f' ({args.layers} layers)' if args.layers else ''}: {counts['total'] / 1e6:,.1f}M params "
          f"(vision {(counts['vision'] + counts['merger']) / 1e6:,.1f}M) | {device_name} {setup['dtype']} | vision {attn}, "
          f"language packed_sdpa | policy pass {args.policy_pass} | grad ckpt {args.gradient_checkpointing} | optimizer {'on' if optimizer else 'off'} "
          f"| peak {fmt(peak or None, '.0f')} TFLOP/s | built in {build_s:.1f}s | load {setup['load_avg_1m']}")
    return setup


def sweep(args, model, optimizer, tokenizer, device, kw):
    """--sweep: the step over frames (4, 8, 16, 32) and over G (4, 8, 16), ours by default; printed as one table."""
    grid = [(f, args.num_generations) for f in (4, 8, 16, 32)] + [(args.frames, g) for g in (4, 8, 16)]
    rows = []
    for frames, G in dict.fromkeys(grid):  # the default point appears in both lines once
        rows.append(measure(model, optimizer, tokenizer, args, device, frames=frames, G=G, **kw))
        print(f"  measured frames={frames} G={G}", file=sys.stderr, flush=True)
    print(f"{args.prompts} prompt(s) | {args.completion_tokens} completion tokens | median of {args.repeats} | seconds per phase")
    print_sweep(rows)
    return {"sweep": rows}


def one_step(args, model, optimizer, tokenizer, device, kw):
    """One step at the flags' shape, both ways (or --only), with T-GRPO's and dynamic sampling's added costs; printed."""
    row = measure(model, optimizer, tokenizer, args, device, frames=args.frames, G=args.num_generations, **kw)
    print(f"{args.prompts} prompt(s) x G={args.num_generations} | video {args.frames} frames, grid {tuple(row['video_grid'])} "
          f"-> {row['video_tokens']} tokens | prompt {row['prompt_tokens']} + completion {args.completion_tokens} tokens "
          f"| median of {args.repeats} after 1 warm-up")
    print_table(row, "peak_mem_GiB" if device.type == "cuda" else "max_rss_GiB")
    if args.temporal_contrast:
        added, total = row["tgrpo_added_s"], row["ours"]["total"]["time_s"]
        # only the rollout runs other code; the other phases' differences are timing noise
        print(f"T-GRPO adds {added['rollout']:.3f}s per step in the rollout ({100 * added['rollout'] / total:+.1f}% of "
              f"ours' step; {args.prompts} shuffled video(s) x {args.num_generations // 2} completions); "
              f"measured total difference {added['total']:+.3f}s")
    if args.dynamic_sampling:
        extra, total = row["dynamic_extra_rollout_s"] + row["dynamic_join_s"], row["ours"]["total"]["time_s"]
        print(f"dynamic sampling adds {extra:.3f}s per extra rollout ({100 * extra / total:+.1f}% of ours' step: rollout "
              f"{row['dynamic_extra_rollout_s']:.3f}s, joining the groups {1000 * row['dynamic_join_s']:.1f} ms); "
              f"--max_resample 4 bounds a step at {1 + 4 * extra / total:.1f}x")
    return row


def decode_report(args, model, tokenizer, device, step_kw):
    """The rollout's decode alone (measure_decode), printed; BENCH_PROFILE=1 also prints each path's profile."""
    if has_linear_attention(model) and set(args.decodes) - {"eager"}:  # sample_completions would decode them eagerly
        print(f"--decode: {model.config.model_type} decodes eagerly (model.sample_completions); static and compiled not "
              f"measured", file=sys.stderr)
        args.decodes = tuple(d for d in args.decodes if d == "eager")
    batch = build_batch(tokenizer, frames=args.frames, prompts=args.prompts, device=device, seed=args.seed,
                        model_type=model.config.model_type)  # the family's patches (Qwen3-VL: 16 px, timestamps)
    torch.manual_seed(args.seed)
    decode, tables = measure_decode(model, batch, G=args.num_generations, C=args.decode_tokens, device=device,
                                    repeats=args.repeats, decodes=args.decodes, **step_kw)
    print_decode(decode)
    if os.environ.get("BENCH_PROFILE"):  # the profiler's top ops per path, for docs/performance.md's profile
        for name, table in tables.items():
            print(f"profile, {name} rollout of {args.decode_tokens} tokens:\n{table}")
    return decode


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.memory:  # the table only: shapes on the meta device, nothing allocated
        return memory_table(args)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # generate's notes on sampling flags would interleave with the table
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as train.py: bf16 on GPU; fp32 on CPU
    attn = vision_attention(args.attn_implementation, device)  # the vision tower's; the language model's is sdpa
    tokenizer, model, build_s = build(args, device, dtype, attn)
    counts = parameter_counts(model)
    optimizer = make_optimizer(args, model, device, counts, torch.finfo(dtype).bits // 8)
    setup = describe(args, model, device, dtype, attn, counts, optimizer, build_s)

    eos, vision = special_token_ids(tokenizer)
    step_kw = {"eos": eos, "never": vision + eos, "pad_token_id": tokenizer.pad_token_id,  # EOS never sampled: fixed lengths
               "policy_pass": args.policy_pass, "compile_rollout": args.compile_rollout}
    kw = dict(step_kw=step_kw, counts=counts, peak_flops=(setup["peak_tflops"] or 0) * 1e12 or None)
    if args.sweep:
        result = {**setup, **sweep(args, model, optimizer, tokenizer, device, kw)}
    else:
        result = {**setup, **one_step(args, model, optimizer, tokenizer, device, kw)}
        if args.decodes:
            result.update(decode_report(args, model, tokenizer, device, step_kw))
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"wall {result['wall_s']:.1f}s")
    print("BENCH_JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
