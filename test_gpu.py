"""
GPU checks, `pytest -m gpu` (skipped without CUDA; pytest.ini leaves them out of the default run). Written and
collected on a CPU machine; not yet run on a GPU (see README, The rollout's decode).

    pytest -m gpu -q test_gpu.py

Tolerances: bf16 keeps 8 bits of mantissa, so a log-prob of the tiny model (|logp| ~ 6, ~20 layers of rounding in
all) moves by ~1e-2; we allow 0.05 mean and 0.5 max absolute difference per token against fp32, and for the rollout
the first greedy token of every row must agree (later tokens may drift once one rounding flips an argmax).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from model import (compiled_decode_step, completion_logps, decode_step, flash_attn_error, prefill, sample_completions,
                   static_cache, use_packed_attention)
from test_grpo import tiny_setup  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
HERE = os.path.dirname(os.path.abspath(__file__))


def on_cuda(model, batch, dtype=torch.float32, vision_attn="sdpa"):
    import copy
    model = copy.deepcopy(model).to("cuda", dtype)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": vision_attn})
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(dtype)
    return use_packed_attention(model).eval(), batch


def kwargs(tokenizer, eos, suppress):
    return dict(num_generations=3, max_new_tokens=16, temperature=1.0, eos_token_ids=eos, suppress_token_ids=suppress,
                pad_token_id=tokenizer.pad_token_id)


def test_bf16_flash_attention_against_fp32_sdpa(tiny_setup):
    if flash_attn_error():
        pytest.skip(f"flash_attn: {flash_attn_error()}")
    tokenizer, model, batch, eos, suppress = tiny_setup
    fp32, batch32 = on_cuda(model, batch)
    bf16, batch16 = on_cuda(model, batch, torch.bfloat16, "flash_attention_2")
    kw = kwargs(tokenizer, eos, suppress)
    ids = sample_completions(fp32, batch32, greedy=True, **kw)                                # (B*G, C)
    ids16 = sample_completions(bf16, batch16, greedy=True, **kw)
    assert torch.equal(ids16[:, 0], ids[:, 0]), "bf16 + flash-attn changed the first greedy token"
    with torch.no_grad():  # the packed policy pass on the same completions
        ref = completion_logps(fp32, batch32, ids, num_generations=3, temperature=1.0)       # (B*G, C)
        ours = completion_logps(bf16, batch16, ids, num_generations=3, temperature=1.0).float()
    diff = (ours - ref).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, f"bf16 log-probs: mean {diff.mean():.4f}, max {diff.max():.4f}"


def test_compiled_decode_with_cuda_graphs_equals_eager(tiny_setup, dtype=torch.float32):
    # reduce-overhead: CUDA graphs replay the step; the weights must still be read live (in place, and swapped p.data,
    # as ZeRO-3's gather does: a new address makes cudagraph trees record again, never replay stale weights)
    tokenizer, model, batch, eos, suppress = tiny_setup
    model, batch = on_cuda(model, batch, dtype)
    kw = kwargs(tokenizer, eos, suppress)
    for greedy in (True, False):
        torch.manual_seed(0)
        ref = sample_completions(model, batch, greedy=greedy, **kw)
        torch.manual_seed(0)
        assert torch.equal(sample_completions(model, batch, greedy=greedy, decode="compiled", **kw), ref)
    before = sample_completions(model, batch, greedy=True, decode="compiled", **kw)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(-1)
    after = sample_completions(model, batch, greedy=True, decode="compiled", **kw)
    assert not torch.equal(after, before) and torch.equal(after, sample_completions(model, batch, greedy=True, **kw))
    weight = model.model.language_model.layers[1].mlp.down_proj.weight
    weight.data = torch.randn_like(weight) * 0.5
    swapped = sample_completions(model, batch, greedy=True, decode="compiled", **kw)
    assert not torch.equal(swapped, after) and torch.equal(swapped, sample_completions(model, batch, greedy=True, **kw))


def test_compiled_decode_step_bf16_logits(tiny_setup):
    # bf16: inductor's fusions round differently from eager, so tokens may part after a near-tie; the step's logits
    # must agree to bf16 precision (0.05 absolute on logits of size ~5, i.e. about 2^-7 relative)
    tokenizer, model, batch, eos, suppress = tiny_setup
    model, batch = on_cuda(model, batch, torch.bfloat16)
    with torch.no_grad():
        logits = []
        for step in (decode_step, compiled_decode_step("reduce-overhead")):
            cache, first, mask, next_pos = prefill(model, batch, 2)
            cache = static_cache(model, cache, 8)
            mask = torch.cat([mask, mask.new_ones(mask.size(0), cache.layers[0].max_cache_len - mask.size(1))], 1)
            for t in range(3):  # warm-up and record, then a replay
                torch.compiler.cudagraph_mark_step_begin()
                out = step(model, first.argmax(-1), next_pos + t, mask, cache).clone()
            logits.append(out)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0.05)


def test_one_step_2b_shaped():
    # bench: one GRPO step at 2B's widths (2 layers), ours against the seed's, and the decode columns
    cmd = [sys.executable, "bench.py", "--shape", "2b", "--layers", "2", "--device", "cuda", "--frames", "4",
           "--num_generations", "2", "--completion_tokens", "16", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON "))[len("BENCH_JSON "):])
    assert result["rollout_decode"] == "compiled" and result["kernels_per_token_compiled"] is not None
    assert result["decode_ms_per_token_compiled"] > 0 and result["ours"]["total"]["time_s"] > 0


def test_policy_pass_peak_memory_against_the_estimate():
    # bench.check_memory's comparison on the GPU, where the allocator counts exactly: the policy pass of 2B's widths
    # (2 layers, the full vocabulary) at the seed's sizes (16 frames, G = 8, 512 tokens), bf16, gradient checkpointing,
    # gradients allocated by a first pass; its peak above the level before it against bench.policy_pass_peak (measured
    # on CPU: 2.75 GiB against 2.99 estimated)
    import bench
    import tiny
    import train
    tokenizer = tiny.build_tiny_tokenizer()
    model = bench.build_model("2b", tokenizer, torch.device("cuda"), torch.bfloat16, "sdpa", layers=2)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = bench.build_batch(tokenizer, frames=16, prompts=1, device=torch.device("cuda"), seed=0)
    (B, P), G, C = batch["input_ids"].shape, 8, 512
    ids = torch.randint(20, len(tokenizer), (B * G, C), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref, advantages, mask = torch.zeros(B * G, C, device="cuda"), torch.randn(B * G, device="cuda"), torch.ones(B * G, C, device="cuda")

    def policy_pass():
        logps = completion_logps(model.train(), batch, ids, num_generations=G, temperature=1.0)
        loss, _ = train.grpo_loss(logps, None, ref, advantages, mask, beta=0.04, epsilon_low=0.2, epsilon_high=0.2,
                                  loss_type="grpo", max_completion_length=C)
        loss.backward()
    policy_pass()
    model.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    policy_pass()
    torch.cuda.synchronize()
    measured = (torch.cuda.max_memory_allocated() - before) / 2**30
    estimate = bench.policy_pass_peak(model, bench.memory_per_gpu(model, world=1, lora_rank=0, B=B, G=G, P=P, C=C))
    print(f"policy pass peak: {measured:.2f} GiB measured, {estimate:.2f} GiB estimated")
    assert 0.7 * estimate <= measured <= 1.1 * estimate
