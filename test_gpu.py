"""
GPU checks, `pytest -m gpu` (skipped without CUDA; pytest.ini leaves them out of the default run). Written and
collected on a CPU machine; not yet run on a GPU: docs/gpu.md has the one script to run first.

    pytest -m gpu -q test_gpu.py

Tolerances: bf16 keeps 8 bits of mantissa, so a log-prob of the tiny model (|logp| ~ 6, ~20 layers of rounding in
all) moves by ~1e-2; we allow 0.05 mean and 0.5 max absolute difference per token against fp32, and for the rollout
the first greedy token must agree on every row whose top two logits are more than 4 bf16 ulps apart (a row whose two
best tokens are 1 ulp apart may flip on a rounding: no error). Paths are compared teacher-forced: both fed the same
tokens (test_rollout_compile.teacher_forced_logits), never each its own argmax, where one flip would make every later
step's comparison meaningless. The 2-rank run is gpu_check.sh's (on 2+ GPUs), not a test here.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import decode as decode_lib
import model as model_lib
from decode import compiled_decode_step, cuda_graph_count, decode_state, decode_step, release_decode_caches
from model import completion_logps, flash_attn_error, prefill, sample_completions, use_packed_attention
from test_grpo import family_inputs, release_rule, tiny_setup  # noqa: F401
from test_rollout_compile import bf16_ulp, teacher_forced_logits, ulps_apart

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
    with torch.no_grad():  # the first token's logits, as the rollout chooses it (vision tokens suppressed)
        first = prefill(fp32, batch32, 3)[1].float().index_fill_(1, torch.tensor(suppress, device="cuda"), -float("inf"))
    top2 = first.topk(2, -1).values                                                          # (B*G, 2)
    clear = (top2[:, 0] - top2[:, 1]) > 4 * bf16_ulp(top2[:, 0])                             # (B*G,)
    assert clear.any(), "no row's first token is clear of bf16 rounding: the check would be empty"
    assert torch.equal(ids16[clear, 0], ids[clear, 0]), "bf16 + flash-attn changed a clear first greedy token"
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


def test_compiled_decode_step_bf16_logprobs(tiny_setup):
    # bf16: inductor's fused kernels keep fp32 intermediates that eager rounds to bf16 between ops, so the step's
    # log-probs differ by a few units of bf16 precision at the logits' scale (the ulp of the row's largest |logit|, 1/32
    # for the tiny model's ~5). Teacher-forced, 4 steps (warm-up, record, then replays), every step compared. The same
    # comparison on CPU: test_rollout_compile.test_compiled_decode_step_bf16_teacher_forced. Allowed: max 8, mean 2; a
    # wrong position, cache slot or mask moves log-probs by whole units. Greedy tokens must agree wherever eager's top
    # two are 8 ulps apart or more.
    tokenizer, model, batch, eos, suppress = tiny_setup
    model, batch = on_cuda(model, batch, torch.bfloat16)
    release_decode_caches()
    tokens = torch.randint(20, 300, (4, 4), generator=torch.Generator().manual_seed(0)).cuda()  # (T, B*G)
    eager = teacher_forced_logits(decode_step, model, batch, tokens)                            # (T, B*G, V)
    compiled = teacher_forced_logits(compiled_decode_step("reduce-overhead"), model, batch, tokens)
    diff = ulps_apart(compiled, eager)                                                           # (T, B*G, V)
    assert diff.max() <= 8 and diff.mean() <= 2, f"compiled vs eager log-probs: max {diff.max():.2f}, mean {diff.mean():.2f} ulps"
    top2 = eager.topk(2, -1).values                                                              # (T, B*G, 2)
    clear = (top2[..., 0] - top2[..., 1]) >= 8 * bf16_ulp(eager.abs().amax(-1))
    assert clear.any() and torch.equal(compiled.argmax(-1)[clear], eager.argmax(-1)[clear])


def test_rollout_positions_through_generate_on_cuda(tiny_setup):
    # positions on CUDA: the compiled rollout's greedy tokens equal transformers' own generate, per prompt, with its
    # get_rope_index replaced by the release rule (test_grpo.release_rule); fp32, so no rounding flips a token
    tokenizer, model, batch, eos, suppress = tiny_setup
    model, batch = on_cuda(model, batch)
    G, C = 2, 12
    ours = sample_completions(model, batch, greedy=True, decode="compiled", **dict(kwargs(tokenizer, eos, suppress),
                                                                                 num_generations=G, max_new_tokens=C))
    for b in range(2):
        row = batch["attention_mask"][b].bool()
        pixel_values = torch.split(batch["pixel_values_videos"], batch["video_grid_thw"].prod(-1).tolist())[b]
        with release_rule(model), torch.no_grad():
            ref = model.generate(input_ids=batch["input_ids"][b:b + 1, row], attention_mask=batch["attention_mask"][b:b + 1, row],
                                 mm_token_type_ids=batch["mm_token_type_ids"][b:b + 1, row], pixel_values_videos=pixel_values,
                                 video_grid_thw=batch["video_grid_thw"][b:b + 1], max_new_tokens=C, do_sample=False,
                                 **family_inputs(model, batch, rows=slice(b, b + 1)),
                                 suppress_tokens=suppress, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        ref = ref[0, row.sum():].tolist()
        for g in range(G):
            assert ours[b * G + g, :len(ref)].tolist() == ref, f"prompt {b}, completion {g}"


def test_cuda_graphs_replay_and_stay_bounded(tiny_setup):
    # the compiled rollout replays CUDA graphs (no cudagraph skips, cudaGraphLaunch on the host every token), and the
    # graphs recorded stay bounded over rollouts: one kept static cache per shape, so later rollouts replay, not record
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile
    tokenizer, model, batch, eos, suppress = tiny_setup
    model, batch = on_cuda(model, batch)
    release_decode_caches()
    skips = counters["inductor"]["cudagraph_skips"]
    kw = dict(kwargs(tokenizer, eos, suppress), eos_token_ids=[], greedy=True)  # no EOS: all 16 tokens every time
    for G in (3, 2):  # two shapes (8 and 4 rows), each recorded once
        for _ in range(2):
            sample_completions(model, batch, decode="compiled", **dict(kw, num_generations=G))
    graphs = cuda_graph_count("cuda")
    assert graphs is not None and 1 <= graphs <= 4, decode_state("cuda")
    for _ in range(3):
        for G in (3, 2):
            sample_completions(model, batch, decode="compiled", **dict(kw, num_generations=G))
    assert cuda_graph_count("cuda") == graphs, f"{graphs} graphs grew to {decode_state('cuda')}"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sample_completions(model, batch, decode="compiled", **kw)
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.name == "cudaGraphLaunch")
    assert launches >= kw["max_new_tokens"] - 1, f"{launches} CUDA graph replays in a {kw['max_new_tokens']}-token rollout"
    assert counters["inductor"]["cudagraph_skips"] == skips, "a cudagraph skip: the step ran without CUDA graphs"
    assert set(decode_state("cuda")["decode_shapes"].values()) == {"compiled"}


def test_one_step_2b_shaped():
    # bench: one GRPO step at 2B's widths (2 layers), ours against Video-R1's first trainer's, and the decode columns
    cmd = [sys.executable, "bench.py", "--shape", "2b", "--layers", "2", "--device", "cuda", "--frames", "4",
           "--num_generations", "2", "--completion_tokens", "16", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON "))[len("BENCH_JSON "):])
    assert result["graph_replays_per_token_compiled"] >= 1
    assert result["cudagraph_skips"] == 0 and 1 <= result["cuda_graphs"] <= decode_lib.CUDA_GRAPHS_MAX, result
    assert result["decode_ms_per_token_compiled"] > 0 and result["ours"]["total"]["time_s"] > 0


def test_policy_pass_peak_memory_against_the_estimate():
    # bench.check_memory's comparison on the GPU, where the allocator counts exactly: the policy pass of 2B's widths
    # (2 layers, the full vocabulary) at Video-R1's first trainer's sizes (16 frames, G = 8, 512 tokens), bf16, gradient checkpointing,
    # gradients allocated by a first pass; its peak above the level before it against bench.policy_pass_peak (measured
    # on CPU: 2.75 GiB against 2.99 estimated)
    import bench
    import tiny
    import train
    tokenizer = tiny.build_tiny_tokenizer()
    model = bench.build_model("2b", tokenizer, torch.device("cuda"), torch.bfloat16, "sdpa", layers=2)
    model_lib.checkpoint_activations(model)
    batch = bench.build_batch(tokenizer, frames=16, prompts=1, device=torch.device("cuda"), seed=0)
    (B, P), G, C = batch["input_ids"].shape, 8, 512
    ids = torch.randint(20, len(tokenizer), (B * G, C), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref, advantages, mask = torch.zeros(B * G, C, device="cuda"), torch.randn(B * G, device="cuda"), torch.ones(B * G, C, device="cuda")

    def policy_pass():
        logps = completion_logps(model.train(), batch, ids, num_generations=G, temperature=1.0)
        loss, _ = train.grpo_loss(logps, None, ref, advantages, mask, train.LossSettings(max_completion_length=C))
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
