"""
Tests of tiny.py: the tokenizer, the saved HF folder, and the format warm start that gives `train.py --tiny` a
reward signal. Offline, CPU.

    .venv/bin/pytest -q test_tiny.py
"""
import pytest
import torch

import data
import rewards
import tiny
import vision
from model import completion_mask, decode_completions, sample_completions, special_token_ids


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def test_tokenizer_tags_are_single_tokens_and_round_trip(tokenizer):
    text = "<think>I see a red square.</think><answer>3</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for tag in rewards.TAGS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(tag)) == tag
    for token in tiny.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    prompt = data.build_prompt_text(tokenizer, "How many circles are there?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_saved_folder_loads_with_from_pretrained(model_dir):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert model.lm_head.weight.shape[0] == len(tokenizer)
    settings = data.video_settings_from_pretrained(model_dir)
    assert (settings.patch_size, settings.temporal_patch_size, settings.merge_size) == (14, 2, 2)
    assert tiny.save_tiny_model(model_dir) == model_dir  # an existing folder is reused, not rebuilt


def test_warm_start_is_deterministic(model_dir, tokenizer, tmp_path):
    from safetensors.torch import load_file
    first = load_file(f"{model_dir}/model.safetensors")
    rng = torch.get_rng_state()
    second = load_file(f"{tiny.save_tiny_model(str(tmp_path / 'again'))}/model.safetensors")  # same seed, rebuilt
    assert torch.equal(torch.get_rng_state(), rng), "building moved the caller's RNG (train.py seeds before it)"
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    a, b = (tiny.warm_start_format(tiny.build_tiny_model(tokenizer, seed=seed), tokenizer, seed=seed, steps=3)
            for seed in (0, 1))
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)  # another seed, another model
    # the vision tower stays as built: the warm start teaches nothing about videos
    assert torch.equal(a.model.visual.patch_embed.proj.weight,
                       tiny.build_tiny_model(tokenizer, seed=0).model.visual.patch_embed.proj.weight)


def sample(model, tokenizer, G=8, seed=0):
    """G completions for each of 4 prompts in train.py's format (4-frame 112x112 clips: grid (2, 8, 8)), at
    train.py --tiny's settings. Returns (completions, solutions per completion)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[2, 8, 8]])
    items = []
    for i, problem in enumerate(("How many red objects are in the video?", "How many circles are there?",
                                 "How many objects are moving?", "How many objects are there in total?")):
        input_ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, problem), grid)
        frames = torch.randint(0, 256, (4, 112, 112, 3), generator=gen, dtype=torch.uint8).numpy()
        pixel_values, grid_thw = vision.video_to_patches(frames)
        assert torch.equal(grid_thw, grid)
        items.append({"input_ids": input_ids, "mm_token_type_ids": types, "pixel_values_videos": pixel_values,
                      "video_grid_thw": grid_thw, "problem": problem, "solution": f"<answer>{i + 1}</answer>",
                      "video": "v.mp4", "index": i})
    batch = data.collate(items, pad_token_id=tokenizer.pad_token_id)
    eos, suppress = special_token_ids(tokenizer)
    torch.manual_seed(seed)
    ids = sample_completions(model, batch, num_generations=G, max_new_tokens=tiny.TRAIN_PRESET["max_completion_length"],
                                   temperature=1.0, eos_token_ids=eos, suppress_token_ids=suppress,
                                   pad_token_id=tokenizer.pad_token_id)
    completions = decode_completions(tokenizer, ids, completion_mask(ids, eos))
    return completions, [s for s in batch["solution"] for _ in range(G)]


def test_warm_start_gives_a_format_reward_the_random_model_lacks(model_dir, tokenizer):
    from transformers import Qwen2VLForConditionalGeneration
    warm = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    completions, solutions = sample(warm, tokenizer)
    fmt = torch.tensor(rewards.format_reward(completions))                        # (32,)
    acc = torch.tensor(rewards.accuracy_reward(completions, solutions))          # (32,)
    assert 0.3 < fmt.mean() < 1.0, completions  # the format is learned, with room left for RL
    assert acc.mean() < 0.5, completions  # the answers are random: accuracy stays near chance (1/7 of the formatted)
    assert (fmt + acc).view(4, 8).std(1).gt(0).all(), "a group of equal rewards: its advantages would all be 0"
    assert len({rewards.thinking_text(c) for c in completions}) > 8, completions  # the thoughts vary
    random_completions, _ = sample(tiny.build_tiny_model(tokenizer, seed=0).eval(), tokenizer)
    assert sum(rewards.format_reward(random_completions)) == 0.0


QWEN = __import__("pathlib").Path(__file__).resolve().parent.parent / "shared" / "qwen"


@pytest.mark.parametrize("name", ["Qwen2-VL-2B-Instruct", "Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct"])
def test_tiny_chat_template_renders_what_the_real_one_does(name, tokenizer, tmp_path):
    # the genuine tokenizer files of the published checkpoints (../shared/qwen, see its README): our prompt rendered by
    # their chat template is the text tiny.py's template renders, and both split it into the same special tokens
    if not (QWEN / name).is_dir():
        pytest.skip(f"{QWEN / name} absent")
    import shutil
    from transformers import AutoTokenizer
    for f in [*(QWEN / name).iterdir(), QWEN / "vocab.json", QWEN / "merges.txt"]:
        shutil.copy(f, tmp_path)
    real = AutoTokenizer.from_pretrained(str(tmp_path))
    problem = "How many red objects are in the video?"
    text = data.build_prompt_text(real, problem)
    assert text == data.build_prompt_text(tokenizer, problem)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|video_pad|><|vision_end|>") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    specials = lambda tok: [t for t in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
                            if t in tiny.SPECIAL_TOKENS]
    assert specials(real) == specials(tokenizer) == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>",
                                                     "<|video_pad|>", "<|vision_end|>", "<|im_end|>", "<|im_start|>"]
    # the tokens around the video and the turn markers decode to the same text in both vocabularies
    assert real.decode(real(text, add_special_tokens=False)["input_ids"]) == text
    assert [real.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS] == list(range(151643, 151657))


def test_checkpoint_activations_on_either_transformers_name():
    # transformers 5.23's activation_checkpointing_enable, or 5.17's gradient_checkpointing_enable (a GPU node's, which
    # lacks the newer name: docs/gpu.md), non-reentrant either way
    import model as model_lib
    net = tiny.build_tiny_model(tiny.build_tiny_tokenizer())
    model_lib.checkpoint_activations(net)
    assert net.is_gradient_checkpointing
    calls = []

    class Older:  # transformers 5.17's surface
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    model_lib.checkpoint_activations(Older())
    assert calls == [{"use_reentrant": False}]
