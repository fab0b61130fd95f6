"""
A tiny Qwen2-VL and a tokenizer trained in code, for offline tests and `train.py --tiny`.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few paragraphs written below, with
Qwen2-VL's special tokens and chat format; the model is a Qwen2VLForConditionalGeneration of ~0.2M parameters.
`save_tiny_model(dir)` writes an ordinary HF model folder (config, safetensors, tokenizer,
preprocessor_config.json), so train.py and eval.py load it through the same `from_pretrained` path as a
real Qwen2-VL checkpoint.

The warm start. A random model never writes <think>...</think><answer>N</answer>: both rewards would be 0, every
advantage 0, and the demo would show the machinery but no RL. So save_tiny_model first trains the language model
briefly (60 AdamW steps of 8 examples, ~3 s on CPU) by next-token prediction on that completion format, after real
chat-formatted prompts with 32 video tokens of random pixels, loss on the completion only: a small stand-in for the
instruct tuning the real model had. It stops short of convergence: sampled at temperature 1 within 48 tokens it keeps
the format ~70% of the time, so the format reward has room to grow. The numbers in its answers are uniform in 0-6
and independent of the video, so its accuracy is chance (~0.1). What RL can learn from there: the format (shorter
thoughts break it less), the answer distribution of the synthetic set (mostly 0-2), and only then, hardest for a
model this small, to count. Measured: 60-100 GRPO steps take format ~0.75 -> ~0.9 and accuracy ~0.14 -> ~0.2, by
the first two, not by counting. `build_tiny_model` stays the purely random model (tests of the model passes use it).

    python tiny.py data/tiny-qwen2-vl
    python tiny.py data/tiny-qwen2.5-vl qwen2.5-vl    # the same architecture sizes as a Qwen2.5-VL
    python tiny.py data/tiny-qwen3.5 qwen3.5          # a hybrid Qwen3.5: 3 Gated DeltaNet layers + 1 full attention
"""
import json
import os
import sys
import time

import torch

# Qwen2-VL's special tokens, in its order (their ids differ here: the tiny vocabulary is small)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat format: a default system turn, then <|im_start|>role\n...<|im_end|>\n per message;
# an image or video content part becomes <|vision_start|><|image_pad|/<|video_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# what the tokenizer is trained on: the words the prompts and completions of this project use
CORPUS = """
How many red objects are in the video? How many objects are moving? How many circles are there?
How many green squares are in the video? How many blue objects stay still? How many yellow shapes?
How many metal spheres are sliding? How many cubes are rotating? How many cylinders are there?
Output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags.
<think>Let me count the objects in the video. I see a red square, a green circle and a blue cube.
The first one moves left, the second one moves right, so two of them are moving.</think>
<answer>0</answer> <answer>1</answer> <answer>2</answer> <answer>3</answer> <answer>4</answer>
<answer>5</answer> <answer>6</answer> <answer>7</answer> <answer>8</answer> <answer>9</answer>
You are a helpful assistant. system user assistant
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 one two three four five six
Wait, let me check again. There is one more object behind the large cylinder, so the answer is three.
"""


def build_tiny_tokenizer(vocab_size=512):
    """A byte-level BPE (like Qwen2's) trained on CORPUS, with Qwen2-VL's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    # the tags are single tokens in Qwen2's vocabulary too; adding them keeps tiny completions short
    tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


# train.py --tiny: every default that makes the whole loop run offline on 2 CPU cores in about a minute. The tiny model is
# warm-started on the answer format (tiny.py), so the demo has a reward signal: format and accuracy move in 60 steps.
TRAIN_PRESET = dict(model_name_or_path="data/tiny-qwen2-vl", data="data/synthetic/train.jsonl", output_dir="runs/tiny",
                    max_frames=4, min_pixels=112 * 112, max_pixels=112 * 112, num_generations=8, prompts_per_device=4,
                    max_completion_length=48, learning_rate=2e-3, max_steps=60, bf16=False, save_steps=20,
                    log_samples_steps=10, num_workers=1, top_k=0)  # top_k 0: the README's demo numbers sample all 512 ids


# --tiny_model name -> config.json's model_type (model.FAMILIES)
TINY_MODELS = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl", "qwen3.5": "qwen3_5"}


def build_tiny_model(tokenizer, seed=0, init_std=0.02, family="qwen2_vl", vocab_size=None):
    """A random Qwen2-VL (family "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") with the real architecture at toy sizes
    (~0.2M parameters). Tests use a larger init_std: at 0.02 the random model's next token barely depends on the
    context, so position or cache bugs would hide. vocab_size: embedding rows (default: the tokenizer's ids; a real
    checkpoint has more, e.g. 151,936 against Qwen3-VL's 151,669)."""
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
        # M-RoPE splits head_dim/2 = 8 rotary frequencies over (time, height, width)
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        initializer_range=init_std,
    )
    common = dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision_config = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=64, **common)
    elif family == "qwen2_5_vl":
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        # window_size 56 px = 2x2 merged patches: the tests' 4x4 and 4x6 grids split into several windows; block 0
        # runs window attention, block 1 full attention, as the real tower alternates them; 2 tokens per second as 3B/7B
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                             window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, **common)
    elif family == "qwen3_vl":
        config_class, model_class = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
        # 16-px patches; DeepStack taps after vision blocks 0 and 1, added after decoder layers 0 and 1 (the real
        # ones tap three blocks), so 3 decoder layers: a tap after the last one would reach no logit the passes keep;
        # interleaved M-RoPE; a learned 8x8 position grid, interpolated to each video's size
        common = dict(common, patch_size=16)
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                             num_position_embeddings=64, deepstack_visual_indexes=[0, 1], **common)
        text_config.update(num_hidden_layers=3, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                      "mrope_interleaved": True})
    elif family == "qwen3_5":
        config_class, model_class = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
        # Qwen3-VL's tower without DeepStack; the text stack a hybrid: full_attention_interval 4 = three Gated DeltaNet
        # (linear attention) layers, then one gated full-attention layer (4 layers: both kinds, the recurrent state
        # carried through three); head_dim 32 with partial rotary 0.25 = 4 rotary frequencies, interleaved M-RoPE
        common = dict(common, patch_size=16)
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                             num_position_embeddings=64, **common)
        text_config.pop("rope_scaling"), text_config.pop("rope_theta")
        text_config.update(num_hidden_layers=4, head_dim=32, full_attention_interval=4, linear_num_key_heads=2,
                           linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                            "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    else:
        raise ValueError(f"build_tiny_model: family {family!r}, choose one of {sorted(TINY_MODELS.values())}")
    config = config_class(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


# Qwen2-VL's image processor settings (patch layout and CLIP normalisation); the pixel bounds of the videos
# come from the trainer's config, as in Video-R1's first trainer.
PREPROCESSOR_CONFIG = {
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}

# Qwen3-VL's (its published preprocessor configs): 16-px patches, mean = std = 0.5
QWEN3_PREPROCESSOR = {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

# the warm start's data: questions like the synthetic ones, and think sentences built from CORPUS's words
WARM_PROBLEMS = (
    "How many red objects are in the video?", "How many green objects are in the video?", "How many circles are there?",
    "How many squares are there?", "How many objects are moving?", "How many objects are there in total?",
    "How many blue objects stay still?", "How many cubes are rotating?",
)
WARM_THOUGHTS = (
    "Let me count the objects in the video.", "I see a red square, a green circle and a blue cube.",
    "The first one moves left, the second one moves right.", "Wait, let me check again.",
    "There is one more object behind the large cylinder.", "I see a yellow circle.", "Two of them are moving.",
)


def format_batch(tokenizer, prompts, gen, batch_size, grid_thw, patch_dim=3 * 2 * 14 * 14):
    """A left-padded batch shaped like train.py's (video tokens, mm_token_type_ids, pixel values, grid), each prompt
    followed by <think>1-3 sentences</think><answer>N</answer><|im_end|>, N uniform in 0-6. Labels: the completions."""
    import data
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=gen))]
    items, lengths = [], []
    for _ in range(batch_size):
        prompt_ids, types = pick(prompts)
        thought = " ".join(pick(WARM_THOUGHTS) for _ in range(int(torch.randint(1, 4, (1,), generator=gen))))
        number = int(torch.randint(0, 7, (1,), generator=gen))  # random: nothing about the video is taught
        completion = f"<think>{thought}</think><answer>{number}</answer><|im_end|>"
        completion_ids = torch.tensor(tokenizer(completion, add_special_tokens=False)["input_ids"])
        items.append({"input_ids": torch.cat([prompt_ids, completion_ids]),
                      "mm_token_type_ids": torch.cat([types, torch.zeros_like(completion_ids)]),
                      "pixel_values_videos": torch.randn(int(grid_thw.prod()), patch_dim, generator=gen),
                      "video_grid_thw": grid_thw, "second_per_grid_ts": torch.tensor([1.0]),  # 2 frames per patch at 2 fps
                      "problem": "", "solution": "", "video": "", "index": 0})
        lengths.append(len(completion_ids))
    batch = data.collate(items, pad_token_id=tokenizer.pad_token_id)
    labels = torch.full_like(batch["input_ids"], -100)  # loss only on the completions, which end their rows
    for b, n in enumerate(lengths):
        labels[b, -n:] = batch["input_ids"][b, -n:]
    return batch, labels


def warm_start_format(model, tokenizer, seed=0, steps=60, lr=3e-3, batch_size=8, grid=None):
    """Supervised next-token training of the language model on the completion format (see the module docstring);
    the vision tower is left random. grid (2, 8, 8) is a 4-frame 112x112 clip, as train.py --tiny reads them (Qwen3-VL:
    (2, 6, 6), its 32-px factor rounds the 112x112 frames down to 96x96).
    60 steps is short of convergence on purpose: format ~0.7 at temperature 1 (120 steps: ~0.85, 200: ~0.95)"""
    import data
    import model as model_lib
    t0 = time.time()
    timestamped = model.config.model_type in data.TIMESTAMPED  # Qwen3-VL, Qwen3.5: 16-px patches, timestamped frames
    grid = grid or ((2, 6, 6) if timestamped else (2, 8, 8))  # Qwen3-VL: 112x112 -> 96x96
    gen = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor([grid])
    vision = model.config.vision_config
    # Qwen3-VL's prompt times each frame pair: those of 4 frames of a 16-frame 8-fps synthetic clip, as --tiny reads them
    timestamps = data.video_timestamps([0, 5, 10, 15], 8.0) if timestamped else None
    prompts = [data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, p), grid_thw, timestamps=timestamps)
               for p in WARM_PROBLEMS]
    model.model.visual.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    # one thread: at these sizes a second one saves ~15% on an idle CPU but runs ~20x slower when another process
    # holds a core (threads wait on each other at every op); the result also cannot depend on the thread count
    threads, losses = torch.get_num_threads(), []
    torch.set_num_threads(1)
    model.train()
    for _ in range(steps):
        batch, labels = format_batch(tokenizer, prompts, gen, batch_size, grid_thw,
                                     3 * vision.temporal_patch_size * vision.patch_size ** 2)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                     position_ids=model_lib.prompt_positions(model, batch)[0],  # the family's rule, as every pass
                     mm_token_type_ids=batch["mm_token_type_ids"], pixel_values_videos=batch["pixel_values_videos"],
                     video_grid_thw=batch["video_grid_thw"], **model_lib.position_inputs(model, batch)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    model.eval().requires_grad_(True)
    last = sum(losses[-10:]) / len(losses[-10:])
    print(f"tiny warm start: {steps} steps x {batch_size} format completions, lr {lr}: completion loss "
          f"{losses[0]:.2f} -> {last:.2f} (mean of the last 10), {time.time() - t0:.1f}s")
    return model


def save_tiny_model(out_dir, seed=0, warm_start=True, family="qwen2_vl"):
    """Write a tiny HF model folder of `family` to out_dir, format warm start included unless warm_start=False
    (idempotent: an existing complete folder is left as is, so delete it to rebuild after changing this file)."""
    if os.path.exists(os.path.join(out_dir, "config.json")) and os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was: a first --tiny run = a later one
        model = build_tiny_model(tokenizer, seed=seed, family=family)
        if warm_start:
            warm_start_format(model, tokenizer, seed=seed)
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"  # write aside, then rename: a concurrent reader never sees half
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        # Qwen3.5 has no processor of its own: transformers maps it to Qwen3VLProcessor and Qwen3-VL's video processor
        processor = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor", "qwen3_5": "Qwen3VLProcessor"}.get(family, "Qwen2VLProcessor")
        settings = QWEN3_PREPROCESSOR if family in ("qwen3_vl", "qwen3_5") else {}  # Qwen2.5-VL: the same image settings as Qwen2-VL
        json.dump(dict(PREPROCESSOR_CONFIG, processor_class=processor, **settings), f, indent=2)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


if __name__ == "__main__":
    name = sys.argv[2] if len(sys.argv) > 2 else "qwen2-vl"  # python tiny.py DIR [qwen2-vl|qwen2.5-vl|qwen3-vl|qwen3.5]
    out = save_tiny_model(sys.argv[1] if len(sys.argv) > 1 else f"data/tiny-{name}", family=TINY_MODELS[name])
    print(f"tiny {name} written to {out}")
