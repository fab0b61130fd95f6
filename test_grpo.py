"""
Tests of the GRPO math and the model passes in train.py, offline on CPU with the tiny random Qwen2-VL.

The math is checked against naive loops written from the formulas (values and gradients); the fast model passes
(video encoded once, prompt prefilled once) against slow ones (video repeated G times, transformers' own
positions and generate); and the whole trainer by subprocess runs.
"""
import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import tiny
import train
from model import (VISION_TOKENS, ModelError, add_lora, completion_logps, completion_logps_shared_prompt, load_model,
                   lora_targets, packed_attention, packed_masks, reference, sample_completions, selective_log_softmax,
                   use_packed_attention, vision_attention)

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------------------
# naive references, written from the formulas one scalar at a time

def naive_advantages(rewards, G, scale, eps=1e-4):
    out = []
    for g in range(0, len(rewards), G):
        group = [float(r) for r in rewards[g:g + G]]
        mean = sum(group) / G
        std = (sum((r - mean) ** 2 for r in group) / (G - 1)) ** 0.5
        out += [(r - mean) / (std + eps) if scale == "group" else r - mean for r in group]
    return torch.tensor(out)


def naive_loss(logps, old_logps, ref_logps, adv, mask, beta, eps_low, eps_high, loss_type, max_len):
    N, T = logps.shape
    terms = [[None] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            old = logps[i, t].detach() if old_logps is None else old_logps[i, t]
            ratio = torch.exp(logps[i, t] - old)
            term = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[i])
            if beta != 0:
                d = ref_logps[i, t] - logps[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            terms[i][t] = term * mask[i, t]
    if loss_type == "grpo":
        rows = []
        for i in range(N):
            n = int(mask[i].sum())
            rows.append(sum(terms[i]) / n if n > 0 else torch.zeros(()))
        return sum(rows) / N
    total = sum(terms[i][t] for i in range(N) for t in range(T))
    if loss_type == "dapo":
        return total / max(int(mask.sum()), 1)
    return total / (N * max_len)


# ---------------------------------------------------------------------------------------------------------------
# the math

@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_advantages_match_naive(scale):
    torch.manual_seed(0)
    rewards = torch.rand(12).round(decimals=1)
    rewards[4:8] = 0.5  # one group of equal rewards
    adv = train.group_advantages(rewards, 4, scale=scale)
    torch.testing.assert_close(adv, naive_advantages(rewards, 4, scale), rtol=1e-5, atol=1e-6)
    assert torch.all(adv[4:8] == 0), "a group of equal rewards must get advantage 0, never NaN"


def test_group_advantages_rejects_bad_groups():
    with pytest.raises(AssertionError, match="groups of 3"):
        train.group_advantages(torch.zeros(8), 3)
    with pytest.raises(AssertionError, match="at least 2"):
        train.group_advantages(torch.zeros(4), 1)


def test_per_token_kl_matches_formula_and_is_nonnegative():
    torch.manual_seed(0)
    logps, ref = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    kl = train.per_token_kl(logps, ref)
    for i in range(3):
        for t in range(5):
            d = ref[i, t].item() - logps[i, t].item()
            assert kl[i, t].item() == pytest.approx(torch.exp(torch.tensor(d)).item() - d - 1, rel=1e-5, abs=1e-6)
    assert (kl >= 0).all() and train.per_token_kl(logps, logps).abs().max() == 0


def test_completion_mask_matches_naive():
    eos = [7, 9]
    ids = torch.tensor([[1, 2, 7, 0, 0], [7, 1, 1, 1, 1], [1, 2, 3, 4, 5], [1, 9, 7, 2, 2], [1, 1, 1, 1, 9]])
    expected = []
    for row in ids.tolist():
        first = next((t for t, x in enumerate(row) if x in eos), len(row))
        expected.append([1 if t <= first else 0 for t in range(len(row))])
    assert train.completion_mask(ids, eos).tolist() == expected


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_grpo_loss_matches_naive_values_and_grads(loss_type, beta, off_policy):
    torch.manual_seed(1)
    N, T = 6, 5
    logps = (-torch.rand(N, T) * 2).requires_grad_(True)
    # old log-probs far enough away that the ratio leaves [0.8, 1.2] on many tokens: clipping is active
    old = (logps.detach() + torch.randn(N, T) * 0.5) if off_policy else None
    ref = -torch.rand(N, T) * 2 if beta else None
    adv = torch.randn(N)
    mask = (torch.rand(N, T) > 0.3).int()
    mask[2] = 0  # a completion with no token contributes 0, never NaN
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T)
    loss, stats = train.grpo_loss(logps, old, ref, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, logps)
    logps2 = logps.detach().clone().requires_grad_(True)
    ref_loss = naive_loss(logps2, old, ref, adv, mask, beta, 0.2, 0.28, loss_type, T)
    (ref_grad,) = torch.autograd.grad(ref_loss, logps2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss) and grad[2].abs().max() == 0
    if off_policy:
        assert stats["clip_ratio"] > 0
    assert (stats["kl"] > 0) == (beta > 0)


def test_grpo_loss_all_masked_is_zero_not_nan():
    logps = torch.zeros(2, 3, requires_grad=True)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        loss, _ = train.grpo_loss(logps, None, None, torch.ones(2), torch.zeros(2, 3, dtype=torch.int), beta=0.0,
                                  epsilon_low=0.2, epsilon_high=0.2, loss_type=loss_type, max_completion_length=3)
        assert loss.item() == 0.0


def test_on_policy_gradient_is_the_policy_gradient():
    # with old_logps=None the ratio is 1 but d/dlogp of -ratio*A is -A: the REINFORCE-with-baseline gradient
    logps = torch.zeros(2, 2, requires_grad=True)
    loss, _ = train.grpo_loss(logps, None, None, torch.tensor([1.0, -1.0]), torch.ones(2, 2), beta=0.0,
                              epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", max_completion_length=2)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_selective_log_softmax_matches_log_softmax():
    torch.manual_seed(0)
    logits, index = torch.randn(3, 4, 11), torch.randint(0, 11, (3, 4))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index, 0.7), expected)


def test_rewards_follow_their_own_prompt():
    # prompts_per_device=2: completions are ordered prompt by prompt, each scored against its own solution
    import rewards
    completions = ["<think></think><answer>3</answer>"] * 3 + ["<think></think><answer>5</answer>"] * 3
    per_reward, total = train.compute_rewards([rewards.accuracy_reward, rewards.format_reward], [1.0, 0.5],
                                              completions, ["<answer>3</answer>", "<answer>5</answer>"], 3)
    assert per_reward[0].tolist() == [1.0] * 6 and total.tolist() == [1.5] * 6
    _, swapped = train.compute_rewards([rewards.accuracy_reward], [1.0], completions,
                                       ["<answer>5</answer>", "<answer>3</answer>"], 3)
    assert swapped.tolist() == [0.0] * 6


# ---------------------------------------------------------------------------------------------------------------
# the model passes, on the tiny model and two prompts of different lengths (left padding)

# every model-pass test runs on both families: Qwen2.5-VL adds window attention in the vision tower and time-based
# video positions (second_per_grid_ts), which each pass must get right
@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_setup(request):
    tokenizer = tiny.build_tiny_tokenizer()
    model = tiny.build_tiny_model(tokenizer, seed=0, init_std=0.2, family=request.param)  # context-sensitive: see tiny.py
    model = use_packed_attention(model.eval())
    torch.manual_seed(0)
    items = []
    for problem, grid, seconds in (("How many red objects are in the video?", [4, 4, 4], 1.0),
                                   ("How many?", [2, 4, 6], 0.5)):  # two video sizes and frame rates
        grid = torch.tensor([grid])
        input_ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, problem), grid)
        items.append({"input_ids": input_ids, "mm_token_type_ids": types, "video_grid_thw": grid,
                      "second_per_grid_ts": torch.tensor([seconds]),
                      "pixel_values_videos": torch.randn(int(grid.prod()), 1176),
                      "problem": problem, "solution": "<answer>2</answer>", "video": "v.mp4", "index": len(items)})
    batch = data.collate(items, pad_token_id=tokenizer.pad_token_id)
    assert batch["attention_mask"][1, 0] == 0, "the second prompt should be left-padded"
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    suppress = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return tokenizer, model, batch, eos, suppress


NORMAL_IDS = 20  # random completions start here: tiny.py's specials are 0-13; a <|video_pad|> breaks the video count


def family_inputs(model, batch, G=1, rows=slice(None)):
    """What transformers' own forward / generate of Qwen2.5-VL takes to place the video in time (rows of the batch,
    each repeated G times); written here, not taken from model.py, so that a pass dropping it is caught."""
    if model.config.model_type != "qwen2_5_vl":
        return {}
    return {"second_per_grid_ts": batch["second_per_grid_ts"][rows].repeat_interleave(G)}


def slow_logps(model, batch, completion_ids, G):
    """The seed's way: the video repeated G times, full logits, positions left to transformers."""
    input_ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), completion_ids], 1)
    attention_mask = torch.cat([batch["attention_mask"].repeat_interleave(G, 0), torch.ones_like(completion_ids)], 1)
    types = torch.cat([batch["mm_token_type_ids"].repeat_interleave(G, 0), torch.zeros_like(completion_ids)], 1)
    per_video = batch["video_grid_thw"].prod(-1).tolist()
    videos = torch.split(batch["pixel_values_videos"], per_video)
    pixel_values = torch.cat([v for v in videos for _ in range(G)])
    out = model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types, use_cache=False,
                pixel_values_videos=pixel_values, video_grid_thw=batch["video_grid_thw"].repeat_interleave(G, 0),
                **family_inputs(model, batch, G))
    C = completion_ids.size(1)
    logits = out.logits[:, -C - 1:-1]
    return torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)


def test_packed_logps_equal_slow_path_values_and_grads(tiny_setup):
    # the policy pass packs each prompt with its G completions into one masked row; the slow path runs G full sequences
    tokenizer, model, batch, eos, _ = tiny_setup
    model = copy.deepcopy(model).double()  # float64: the two paths sum in different orders
    batch = dict(batch, pixel_values_videos=batch["pixel_values_videos"].double())
    G, C = 3, 6
    torch.manual_seed(2)
    completion_ids = torch.randint(NORMAL_IDS, 400, (2 * G, C))
    fast = completion_logps(model, batch, completion_ids, num_generations=G, temperature=1.0)
    fast.sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    slow = slow_logps(model, batch, completion_ids, G)
    slow.sum().backward()
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    # Qwen2-VL's RMSNorm computes in float32 even in a float64 model, so gradients summed in another order (the
    # shared prompt's, over G completions) round differently: ~2e-7 of the largest entry, measured
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(fast_grads[name], p.grad, rtol=0, atol=1e-5 * scale, msg=lambda m: f"grad {name}: {m}")
    assert sum(g.abs().sum() > 0 for g in fast_grads.values()) == len(fast_grads)


def test_packed_masks_layout():
    # [prompt (one left pad) | completion 1 | completion 2], by the rules of the docstring, entry by entry
    P, G, C = 3, 2, 2
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    prompt, completion = packed_masks(prompt_mask, G, C)
    assert prompt.shape == (2, 1, P, P) and completion.shape == (2 * G, 1, C, P + C)
    for b in range(2):
        for q in range(P):
            for k in range(P):
                assert prompt[b, 0, q, k] == ((k <= q and prompt_mask[b, k] == 1) or q == k), (b, q, k)
        for g in range(G):
            for q in range(C):
                for k in range(P + C):
                    sees = prompt_mask[b, k] == 1 if k < P else k - P <= q
                    assert completion[b * G + g, 0, q, k] == sees, (b, g, q, k)


def test_packed_attention_equals_a_dense_mask():
    # the two sdpa calls against one sdpa over the whole packed row under the equivalent (L, L) mask, GQA included
    torch.manual_seed(0)
    B, H, H_kv, d, P, G, C = 2, 4, 2, 8, 5, 3, 4
    L = P + G * C
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    q, (k, v) = torch.randn(B, H, L, d, dtype=torch.float64), torch.randn(2, B, H_kv, L, d, dtype=torch.float64)
    out, _ = packed_attention(None, q, k, v, None, scaling=0.3, packed=packed_masks(prompt_mask, G, C))
    segment = torch.arange(G + 1).repeat_interleave(torch.tensor([P] + [C] * G))  # 0: prompt, g: completion g
    index = torch.arange(L)
    dense = (index[None] <= index[:, None]) & ((segment[None] == 0) | (segment[None] == segment[:, None]))
    dense = dense & torch.cat([prompt_mask.bool(), torch.ones(B, G * C, dtype=torch.bool)], 1)[:, None, :] | torch.eye(L, dtype=torch.bool)
    k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], scale=0.3)
    assert out.shape == (B, L, H, d)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_completion_logps_refuses_a_model_without_packed_attention(tiny_setup):
    tokenizer, model, batch, eos, _ = tiny_setup
    plain = copy.deepcopy(model)
    plain.set_attn_implementation({"text_config": "sdpa"})  # its completions would silently see one another
    with pytest.raises(AssertionError, match="use_packed_attention"):
        completion_logps(plain, batch, torch.zeros(4, 3, dtype=torch.long), num_generations=2, temperature=1.0)


def test_load_model_language_model_on_packed_attention(tmp_path):
    tiny.save_tiny_model(str(tmp_path), warm_start=False)
    model = load_model(str(tmp_path), bf16=False, attn_implementation="eager")
    assert model.model.language_model.config._attn_implementation == "packed_sdpa"
    assert model.model.visual.config._attn_implementation == "eager"
    assert vision_attention("auto", torch.device("cpu")) == "sdpa"


def test_shared_prompt_logps_equal_packed_pass(tiny_setup):
    # the no-grad passes (reference, old policy) put the completions on the prompt's repeated KV cache; the policy pass
    # (checked against the slow path above) packs them
    tokenizer, model, batch, eos, _ = tiny_setup
    model = copy.deepcopy(model).double()
    batch = dict(batch, pixel_values_videos=batch["pixel_values_videos"].double())
    completion_ids = torch.randint(NORMAL_IDS, 400, (2 * 3, 7))
    with torch.no_grad():
        full = completion_logps(model, batch, completion_ids, num_generations=3, temperature=0.7)
    shared = completion_logps_shared_prompt(model, batch, completion_ids, num_generations=3, temperature=0.7)
    torch.testing.assert_close(shared, full, rtol=1e-9, atol=1e-9)


def test_rollout_matches_transformers_generate(tiny_setup):
    # greedy: the prefill-once + repeated-cache sampler must produce exactly what HF generate does per prompt
    tokenizer, model, batch, eos, suppress = tiny_setup
    G, C = 2, 12
    ours = sample_completions(model, batch, num_generations=G, max_new_tokens=C, temperature=1.0,
                                    eos_token_ids=eos, suppress_token_ids=suppress,
                                    pad_token_id=tokenizer.pad_token_id, greedy=True)
    assert ours.shape[0] == 2 * G
    for b in range(2):
        row = batch["attention_mask"][b].bool()
        pixel_values = torch.split(batch["pixel_values_videos"], batch["video_grid_thw"].prod(-1).tolist())[b]
        ref = model.generate(input_ids=batch["input_ids"][b:b + 1, row], attention_mask=batch["attention_mask"][b:b + 1, row],
                             mm_token_type_ids=batch["mm_token_type_ids"][b:b + 1, row], pixel_values_videos=pixel_values,
                             video_grid_thw=batch["video_grid_thw"][b:b + 1], max_new_tokens=C, do_sample=False,
                             **family_inputs(model, batch, rows=slice(b, b + 1)),
                             suppress_tokens=suppress, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        ref = ref[0, row.sum():].tolist()
        for g in range(G):  # completion b*G+g belongs to prompt b
            assert ours[b * G + g, :len(ref)].tolist() == ref


def test_rollout_never_samples_vision_tokens(tiny_setup):
    tokenizer, model, batch, eos, suppress = tiny_setup
    torch.manual_seed(0)
    # make the vision tokens the most likely ones: without suppression they would be sampled at once
    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.lm_head.weight[suppress] *= 50
    ids = sample_completions(biased, batch, num_generations=4, max_new_tokens=16, temperature=1.0,
                                   eos_token_ids=eos, suppress_token_ids=suppress, pad_token_id=tokenizer.pad_token_id)
    assert not torch.isin(ids, torch.tensor(suppress)).any()


def test_reference_sees_the_video_kl_zero_at_init(tiny_setup):
    tokenizer, model, batch, eos, suppress = tiny_setup
    ref_model = copy.deepcopy(model)
    completion_ids = torch.randint(NORMAL_IDS, 400, (4, 5))
    with torch.no_grad():
        logps = completion_logps(model, batch, completion_ids, num_generations=2, temperature=1.0)
        ref = completion_logps(ref_model, batch, completion_ids, num_generations=2, temperature=1.0)
        assert train.per_token_kl(logps, ref).abs().max().item() == 0.0
    # the reference pass as train.py runs it (prompt shared): float32 sums in another order, so ~0 instead of 0
    ref = completion_logps_shared_prompt(ref_model, batch, completion_ids, num_generations=2, temperature=1.0)
    assert train.per_token_kl(logps, ref).abs().max().item() < 1e-10
    # and the video matters: other pixels give other log-probs (a blind reference would not notice)
    other = dict(batch, pixel_values_videos=torch.randn_like(batch["pixel_values_videos"]))
    assert (completion_logps_shared_prompt(ref_model, other, completion_ids, num_generations=2, temperature=1.0)
            - ref).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# LoRA: the adapters, the reference (adapters off) and the merged model

def lora_policy(model, target_modules=""):
    """The tiny model in LoRA adapters whose B is random (peft starts it at 0, where on and off would agree trivially)."""
    policy = add_lora(copy.deepcopy(model), rank=4, alpha=8.0, target_modules=target_modules)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy


def test_lora_reference_is_the_base_model_and_kl_zero(tiny_setup):
    tokenizer, model, batch, eos, _ = tiny_setup
    policy = lora_policy(model)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {n for n in dict(policy.named_parameters()) if ".lora_" in n}
    completion_ids = torch.randint(NORMAL_IDS, 400, (4, 5))
    kw = dict(num_generations=2, temperature=1.0)
    base = completion_logps_shared_prompt(model, batch, completion_ids, **kw)
    with reference(policy, None) as ref_model:  # train.py's reference pass under LoRA: no second model
        ref = completion_logps_shared_prompt(ref_model, batch, completion_ids, **kw)
    torch.testing.assert_close(ref, base, rtol=0, atol=1e-5)  # the base model (peft wraps each Linear: ~1e-6 apart)
    assert (completion_logps_shared_prompt(policy, batch, completion_ids, **kw) - base).abs().max() > 1e-3
    # at step 1 peft's B = 0: the policy is the reference and the KL is exactly 0
    fresh = add_lora(copy.deepcopy(model), rank=4, alpha=8.0, target_modules="")
    with torch.no_grad():
        logps = completion_logps(fresh, batch, completion_ids, **kw)
    with reference(fresh, None) as ref_model:
        assert train.per_token_kl(logps, completion_logps(ref_model, batch, completion_ids, **kw)).abs().max().item() == 0.0


def test_lora_targets_language_model_by_default_vision_when_asked(tiny_setup):
    tokenizer, model, batch, eos, _ = tiny_setup
    names = lora_targets(model, "")
    layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * layers and all(".language_model." in n for n in names), names
    vision = lora_targets(model, "q_proj,visual.fc1" if model.config.model_type == "qwen2_vl" else "q_proj,visual.up_proj")
    assert sum(".visual." in n for n in vision) == model.config.vision_config.depth and len(vision) == layers + 2
    with pytest.raises(ModelError, match=r"\['qkvz'\] match no Linear module; the language model has \[.*'q_proj'"):
        lora_targets(model, "q_proj,qkvz")


def test_lora_merged_state_dict_equals_peft_merge(tiny_setup):
    tokenizer, model, batch, eos, _ = tiny_setup
    policy = lora_policy(model)
    merged = checkpoint.merged_lora_state_dict(policy.state_dict(), 8.0 / 4)
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(merged["lm_head.weight"], expected["lm_head.weight"] * 0)


# ---------------------------------------------------------------------------------------------------------------
# the whole trainer, in subprocesses (the distributed state stays out of this process)

def run(cmd, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny.save_tiny_model(str(root / "model"), warm_start=False)  # the random model: the toy reward starts from scratch
    train_path, _ = data.make_synthetic_dataset(str(root / "synthetic"), n_train=16, n_test=2)
    return root, str(root / "model"), str(train_path)


# a dense reward the random tiny model can learn in a few steps: shorter completions (emit <|im_end|> early)
LEARN_SCRIPT = """
import sys, json, rewards, train
rewards.REWARD_FUNCS["short"] = lambda completions, solutions=None: [max(0.0, 1 - len(c) / 200) for c in completions]
train.main(sys.argv[1:])
"""


def test_toy_reward_is_learned(tiny_data):
    root, model_dir, train_path = tiny_data
    out = root / "learn"
    run([sys.executable, "-c", LEARN_SCRIPT, "--tiny", "--model_name_or_path", model_dir, "--data", train_path,
         "--output_dir", str(out), "--rewards", "short", "--max_steps", "20", "--save_steps", "0",
         "--num_generations", "4", "--prompts_per_device", "2",
         "--learning_rate", "1e-2", "--beta", "0", "--num_workers", "0"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 20
    first, last = [r["reward"] for r in rows[:5]], [r["reward"] for r in rows[-5:]]
    # per-step reward std of the first steps is the noise scale; require the gain to be far beyond it
    noise = torch.tensor(first).std().item() + 0.02
    assert sum(last) / 5 - sum(first) / 5 > 3 * noise, f"no learning: first {first}, last {last}"


PARTITION_SCRIPT = """
import os, sys, deepspeed, torch, model
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
plain = model.load_model(sys.argv[1], bf16=False).state_dict()
model.partition_at_load({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
parted = model.load_model(sys.argv[1], bf16=False)
params = dict(parted.named_parameters())
assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values()), "not partitioned at load"
with deepspeed.zero.GatheredParameters(list(params.values())):
    for name, p in params.items():
        assert torch.equal(p, plain[name]), name
print("partitioned all", len(params) == len(plain))
"""


def test_zero3_load_is_partitioned_and_equal(tiny_data):
    # under ZeRO-3 from_pretrained runs inside zero.Init: no rank holds a whole copy, and the gathered weights are the file's
    root, model_dir, _ = tiny_data
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    assert "partitioned all True" in run([sys.executable, "-c", PARTITION_SCRIPT, model_dir, port]).stdout


def test_deepspeed_two_ranks_zero3(tiny_data):
    root, model_dir, train_path = tiny_data
    out = root / "ds"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    with socket.socket() as sock:  # a free port: a fixed one can still be held by an earlier run's store
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run([deepspeed, "--num_gpus", "2", "--master_port", port, "train.py", "--tiny", "--model_name_or_path", model_dir,
         "--data", train_path, "--output_dir", str(out), "--max_steps", "2", "--num_workers", "0",
         "--num_generations", "4", "--prompts_per_device", "2"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "reward", "reward_std", "rewards/accuracy", "rewards/format", "kl", "completion_length",
                "clip_ratio", "frac_zero_std_groups", "grad_norm", "lr", "step_time", "rollout_time", "tokens_per_sec"):
        assert key in rows[0], key
    config = json.load(open(out / "run_config.json"))
    assert config["world_size"] == 2
    from transformers import Qwen2VLForConditionalGeneration
    final = Qwen2VLForConditionalGeneration.from_pretrained(str(out / "final"))
    base = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    assert final.lm_head.weight.shape == base.lm_head.weight.shape  # the full weights, gathered from the shards
    for name in ("tokenizer.json", "preprocessor_config.json"):
        assert (out / "final" / name).exists()
