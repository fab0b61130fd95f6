"""
A tiny random Qwen2-VL and a tokenizer trained in code, for offline tests and `train.py --tiny`.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few paragraphs written below, with
Qwen2-VL's special tokens and chat format; the model is a Qwen2VLForConditionalGeneration of ~0.2M random
parameters. `save_tiny_model(dir)` writes an ordinary HF model folder (config, safetensors, tokenizer,
preprocessor_config.json), so train.py and eval.py load it through the same `from_pretrained` path as a
real Qwen2-VL checkpoint.

    python tiny.py data/tiny-qwen2-vl
"""
import json
import os
import sys

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


def build_tiny_model(tokenizer, seed=0, init_std=0.02):
    """A random Qwen2-VL with the real architecture at toy sizes (~0.2M parameters). Tests use a larger init_std:
    at 0.02 the random model's next token barely depends on the context, so position or cache bugs would hide."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
            # M-RoPE splits head_dim/2 = 8 rotary frequencies over (time, height, width)
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            initializer_range=init_std,
        ),
        vision_config=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=64, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


# Qwen2-VL's image processor settings (patch layout and CLIP normalisation); the pixel bounds of the videos
# come from the trainer's config, as in the seed.
PREPROCESSOR_CONFIG = {
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def save_tiny_model(out_dir, seed=0):
    """Write a tiny HF model folder to out_dir (idempotent: an existing complete folder is left as is)."""
    if os.path.exists(os.path.join(out_dir, "config.json")) and os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"  # write aside, then rename: a concurrent reader never sees half
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


if __name__ == "__main__":
    out = save_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "data/tiny-qwen2-vl")
    print(f"tiny Qwen2-VL written to {out}")
