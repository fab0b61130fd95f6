"""
Qwen3.5 (hybrid: Gated DeltaNet linear attention + gated full attention) on the project's passes, against transformers
5.23's own forward and generate on a tiny random Qwen3.5 (tiny.py, fp32, a few tokens). A linear-attention layer has a
recurrent state and no attention mask, so every pass that shares a prompt between completions (the packed policy pass,
the reference pass on the repeated cache, the rollout) must start each completion from the prompt's state.
"""
import contextlib
import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import data
import model as model_lib
import tiny
from model import (completion_logps, completion_logps_shared_prompt, lora_targets, sample_completions, use_packed_attention,
                   weight_decay_groups)

NORMAL_IDS = 20  # random completion tokens start past tiny.py's special tokens


@pytest.fixture(scope="module")
def setup():
    """A tiny Qwen3.5 on packed attention (layers: linear, linear, linear, full) and two left-padded timestamped prompts."""
    tokenizer = tiny.build_tiny_tokenizer()
    net = tiny.build_tiny_model(tokenizer, seed=0, init_std=0.2, family="qwen3_5")  # context-sensitive: see tiny.py
    assert net.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    net = use_packed_attention(net.eval())
    vision = net.config.vision_config
    torch.manual_seed(0)
    items = []
    for problem, grid in (("How many red objects are in the video?", [4, 4, 4]), ("How many?", [2, 4, 6])):
        grid = torch.tensor([grid])
        timestamps = data.video_timestamps(list(range(0, 10 * grid[0, 0], 5)), 10.0)
        input_ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, problem), grid, timestamps=timestamps)
        items.append({"input_ids": input_ids, "mm_token_type_ids": types, "video_grid_thw": grid,
                      "second_per_grid_ts": torch.tensor([1.0]),
                      "pixel_values_videos": torch.randn(int(grid.prod()), 3 * vision.temporal_patch_size * vision.patch_size ** 2),
                      "problem": problem, "solution": "<answer>2</answer>", "video": "v.mp4", "index": len(items)})
    batch = data.collate(items, pad_token_id=tokenizer.pad_token_id)
    assert batch["attention_mask"][1, 0] == 0, "the second prompt should be left-padded"
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    suppress = [tokenizer.convert_tokens_to_ids(t) for t in model_lib.VISION_TOKENS]
    return tokenizer, net, batch, eos, suppress


def naive_logps(net, batch, completion_ids, G, T):
    """transformers' own forward on [prompt | completion], one row per completion, the prompt's padding dropped: its own
    vision pass, its own positions (get_rope_index on the row), its own Gated DeltaNet from a zero state. (B*G, C)"""
    out = []
    pixels = torch.split(batch["pixel_values_videos"], batch["video_grid_thw"].prod(-1).tolist())
    for row, ids in enumerate(completion_ids):
        b = row // G
        real = batch["attention_mask"][b].bool()
        input_ids = torch.cat([batch["input_ids"][b, real], ids])[None]                   # (1, P_b + C)
        types = torch.cat([batch["mm_token_type_ids"][b, real], torch.zeros_like(ids)])[None]
        logits = net(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=types,
                     pixel_values_videos=pixels[b], video_grid_thw=batch["video_grid_thw"][b:b + 1]).logits
        logits = logits[0, -ids.numel() - 1:-1].float() / T                                # (C, V)
        out.append(torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1))
    return torch.stack(out)


def test_policy_pass_equals_a_naive_forward_per_completion_with_gradients(setup):
    # the packed pass ([prompt | completion 1 | ... | completion G] in one row) in training mode with gradient
    # checkpointing: per-token log-probs and every parameter's gradient equal transformers' forward run once per
    # completion. Were the linear layers run on the packed row, completion 2 would start from completion 1's state.
    tokenizer, net, batch, eos, suppress = setup
    G, C, T = 3, 5, 0.7
    torch.manual_seed(1)
    completion_ids = torch.randint(NORMAL_IDS, len(tokenizer), (2 * G, C))
    net.gradient_checkpointing_enable()
    net.train()
    try:
        ours = completion_logps(net, batch, completion_ids, num_generations=G, temperature=T)   # (B*G, C)
        ours.sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        ref = naive_logps(net, batch, completion_ids, G, T)
        ref.sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
    finally:
        net.gradient_checkpointing_disable()
        net.eval()
    # 1e-5 relative: transformers' chunked Gated DeltaNet kernel computes in fp32 whatever the dtype, and its rounding
    # depends on where its 64-token chunks start (here the prompt, there [prompt | completion]); split at a chunk
    # boundary the state hand-over is exact (test_prompt_state_hand_over_is_exact_at_a_chunk_boundary)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads)
    linear = [n for n in grads if ".linear_attn." in n]
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in linear} >= {
        "linear_attn.A_log", "linear_attn.dt_bias", "conv1d.weight", "in_proj_qkv.weight", "in_proj_a.weight"}
    for name in grads:
        assert grads[name].abs().max() > 0, name
        # to fp32 rounding of the whole backward (measured: at most ~2e-5 of each tensor's largest entry)
        assert (grads[name] - ref_grads[name]).abs().max() <= 1e-4 * ref_grads[name].abs().max(), name


def test_prompt_state_hand_over_is_exact_at_a_chunk_boundary(setup):
    # one Gated DeltaNet layer: [prompt | completion] at once, against the prompt then the completion from its state
    # (PromptState): bit-equal when the prompt fills whole 64-token chunks (fp64 weights and inputs). And packed_linear_attention on
    # [prompt | completion 1 | completion 2] gives each completion what it gets alone after the prompt, while the plain
    # layer on the packed row lets completion 1's state into completion 2.
    tokenizer, net, batch, eos, suppress = setup
    layer = copy.deepcopy(net.model.language_model.layers[0].linear_attn).double()
    forward = type(layer).forward
    torch.manual_seed(4)
    P, C = 64, 5
    with torch.no_grad():
        h = torch.randn(2, P + 2 * C, net.config.text_config.hidden_size, dtype=torch.float64)  # (B, P + 2C, D)
        state = model_lib.PromptState()
        split = torch.cat([forward(layer, h[:, :P], state, None), forward(layer, h[:, P:P + C], state, None)], 1)
        assert torch.equal(split, forward(layer, h[:, :P + C]))
        packed = layer(h, packed=(P, C))                                                   # (B, P + 2C, D)
        second = forward(layer, torch.cat([h[:, :P], h[:, P + C:]], 1))                    # completion 2 alone
        torch.testing.assert_close(packed[:, :P + C], split, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(packed[:, P + C:], second[:, P:], rtol=1e-6, atol=1e-6)
        assert (forward(layer, h)[:, P + C:] - second[:, P:]).abs().max() > 1e-2


def test_reference_pass_equals_the_policy_pass(setup):
    # the reference pass: one prefill, the hybrid cache (KV + conv + recurrent states) repeated G times, the completions
    # run on it; the same log-probs as the packed pass
    tokenizer, net, batch, eos, suppress = setup
    G, C, T = 2, 6, 1.0
    torch.manual_seed(2)
    completion_ids = torch.randint(NORMAL_IDS, len(tokenizer), (2 * G, C))
    with torch.no_grad():
        policy = completion_logps(net, batch, completion_ids, num_generations=G, temperature=T)
    reference = completion_logps_shared_prompt(net, batch, completion_ids, num_generations=G, temperature=T)
    torch.testing.assert_close(reference, policy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, naive_logps(net, batch, completion_ids, G, T).detach(), rtol=1e-5, atol=1e-5)


def test_rollout_greedy_equals_transformers_generate(setup):
    # prefill once, the hybrid cache repeated for G completions, eager decode: per prompt, exactly generate's tokens
    tokenizer, net, batch, eos, suppress = setup
    G, C = 2, 12
    ours = sample_completions(net, batch, num_generations=G, max_new_tokens=C, temperature=1.0, eos_token_ids=eos,
                              suppress_token_ids=suppress, pad_token_id=tokenizer.pad_token_id, greedy=True)
    pixels = torch.split(batch["pixel_values_videos"], batch["video_grid_thw"].prod(-1).tolist())
    for b in range(2):
        row = batch["attention_mask"][b].bool()
        ref = net.generate(input_ids=batch["input_ids"][b:b + 1, row], attention_mask=batch["attention_mask"][b:b + 1, row],
                           mm_token_type_ids=batch["mm_token_type_ids"][b:b + 1, row], pixel_values_videos=pixels[b],
                           video_grid_thw=batch["video_grid_thw"][b:b + 1], max_new_tokens=C, do_sample=False,
                           suppress_tokens=suppress, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        ref = ref[0, row.sum():].tolist()
        assert len(set(ref)) > 2, "a constant completion would not test the cache"
        for g in range(G):
            assert ours[b * G + g, :len(ref)].tolist() == ref


@pytest.mark.parametrize("decode", ["eager", "compiled"])
def test_rollout_logps_equal_the_policy_pass(setup, decode, monkeypatch):
    # the log-prob of each sampled token under the rollout's own logits equals the packed policy pass's; "compiled"
    # (and "static") decode eagerly for this family, with one warning saying why
    tokenizer, net, batch, eos, suppress = setup
    seen = []
    original = model_lib.apply_repetition_penalty
    monkeypatch.setattr(model_lib, "apply_repetition_penalty", lambda logits, *a: seen.append(logits.clone()) or original(logits, *a))
    G, T = 2, 0.7
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="runs eagerly for qwen3_5") if decode != "eager" else _no_warning():
        completion_ids = sample_completions(net, batch, num_generations=G, max_new_tokens=6, temperature=T, eos_token_ids=eos,
                                            suppress_token_ids=[], pad_token_id=tokenizer.pad_token_id, decode=decode)
    rollout = torch.stack([torch.log_softmax(l / T, -1).gather(-1, tok[:, None]).squeeze(-1)
                           for l, tok in zip(seen, completion_ids.T)], dim=1)             # (B*G, C)
    with torch.no_grad():
        policy = completion_logps(net, batch, completion_ids, num_generations=G, temperature=T)
    torch.testing.assert_close(policy, rollout, rtol=0, atol=2e-5)


@contextlib.contextmanager
def _no_warning():
    """Any warning inside is an error: the eager rollout has nothing to warn about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_lora_targets_name_the_linear_attention_projections_and_decay_groups(setup):
    # default LoRA targets: attention + MLP, and the Gated DeltaNet's qkv, output-gate and output projections; the other
    # families' defaults are unchanged. Weight decay: never on A_log, dt_bias or the gated norm (1-dim), on conv1d
    tokenizer, net, batch, eos, suppress = setup
    names = lora_targets(net, "")
    assert {n.rsplit(".", 1)[-1] for n in names if ".linear_attn." in n} == {"in_proj_qkv", "in_proj_z", "out_proj"}
    assert {n.rsplit(".", 1)[-1] for n in names if ".self_attn." in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len([n for n in names if n.endswith("linear_attn.in_proj_qkv")]) == 3 and not any("visual" in n for n in names)
    qwen3_vl = tiny.build_tiny_model(tokenizer, family="qwen3_vl")
    assert {n.rsplit(".", 1)[-1] for n in lora_targets(qwen3_vl, "")} == set(model_lib.LORA_DEFAULT_TARGETS.split(","))
    decay, no_decay = (set(map(id, g["params"])) for g in weight_decay_groups(net, 0.1))
    for name, p in net.named_parameters():
        expected = not name.endswith(("A_log", "dt_bias", "norm.weight", "layernorm.weight")) and p.dim() >= 2
        assert (id(p) in decay) == expected and (id(p) in no_decay) != expected, name


def test_tiny_folder_has_the_qwen3_vl_video_processing_and_show_prints_timestamps(tmp_path):
    # tiny.py's qwen3.5 folder: Qwen3-VL's processor settings (16-px patches, mean/std 0.5, a timestamp per frame pair);
    # data.py --show prints its prompt with the timestamps, and the model's own positions (each frame pair a t = 1 grid)
    from test_positions import write_clip
    folder = tiny.save_tiny_model(str(tmp_path / "tiny-qwen3.5"), warm_start=False, family="qwen3_5")
    assert json.loads(Path(folder, "config.json").read_text())["model_type"] == "qwen3_5"
    settings = data.video_settings_from_pretrained(folder)
    assert (settings.patch_size, settings.factor, settings.image_mean, settings.frame_timestamps) == (16, 32, (0.5,) * 3, True)
    write_clip(tmp_path / "clip.mp4", 40, 10)  # 4 s at 10 fps: 2 fps samples 8 frames, 4 pairs
    out = subprocess.run([sys.executable, "data.py", "--show", str(tmp_path / "clip.mp4"), "--model_name_or_path", folder,
                          "--min_pixels", str(64 * 64), "--max_pixels", str(64 * 64)],
                         capture_output=True, text=True, cwd=Path(__file__).parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = json.loads(out.stdout.strip().splitlines()[-1])
    assert shown["family"] == "qwen3_5" and shown["grid_thw"] == [4, 4, 4] and len(shown["timestamps"]) == 4
    # frames 0, 5, 10, ... at 10 fps: pairs (0, 5) -> 0.25 s, printed with one decimal as the processor does
    for seconds in shown["timestamps"]:
        assert f"<{seconds:.1f} seconds><|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>" in shown["prompt"]
    T, H, W = shown["position_ids"]
    first = shown["input_ids"].index(tiny.build_tiny_tokenizer().convert_tokens_to_ids("<|video_pad|>"))
    assert T[first:first + 4] == [T[first]] * 4 and H[first:first + 4] == [H[first]] * 2 + [H[first] + 1] * 2


def test_memory_estimate_counts_the_hybrid_cache_and_the_lora_adapters(setup):
    # bench.memory_per_gpu's "KV cache (rollout)" for Qwen3.5: KV in the full-attention layer, a conv and a recurrent
    # state per Gated DeltaNet layer, against the bytes of the cache prefill really holds; its LoRA count against peft's
    import bench
    tokenizer, net, batch, eos, suppress = setup
    G, P = 3, batch["input_ids"].size(1)
    with torch.no_grad():
        cache = model_lib.prefill(net, batch, G)[0]
    tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None),
                                                     *getattr(layer, "conv_states", {}).values(),
                                                     *getattr(layer, "recurrent_states", {}).values()) if t is not None]
    assert len(tensors) == 2 + 3 * 2 and all(t.size(0) == 2 * G for t in tensors)
    terms = bench.memory_per_gpu(net, world=1, lora_rank=4, B=2, G=G, P=P, C=0, bytes_per=4)  # fp32 here
    assert terms["KV cache (rollout)"] * 2**30 == sum(t.numel() * t.element_size() for t in tensors)
    lora = model_lib.add_lora(copy.deepcopy(net), rank=4, alpha=8.0, target_modules="")
    assert terms["trainable parameters"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_eval_tiny_model_flag(capsys):
    # eval.py --tiny --tiny_model qwen3.5 evaluates train.py --tiny --tiny_model qwen3.5's tiny folder; a family it does not
    # know is one error line
    import eval as evaluate
    assert evaluate.parse_config(["--tiny", "--tiny_model", "qwen3.5"]).model == ["data/tiny-qwen3.5"]
    assert evaluate.parse_config(["--tiny"]).model == ["data/tiny-qwen2-vl"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_config(["--tiny", "--tiny_model", "qwen9"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--tiny_model 'qwen9': choose one of" in err and "qwen3.5" in err
