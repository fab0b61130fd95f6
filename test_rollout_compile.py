"""
The rollout on a static KV cache, eager and compiled (model.sample_completions decode="static" / "compiled"), against
the eager DynamicCache loop it must equal token for token; and each path's own log-probs against the policy pass's.
CPU, tiny model; each compiled test compiles once (~20-60 s).
"""
import copy
import re

import pytest
import torch

import eval as evaluate
import train
from decode import compiled_decode_step, decode_step, static_cache
from model import ModelError, prefill, rollout_decode, sample_completions
from test_grpo import tiny_setup  # noqa: F401  (the fixture: tiny model, two left-padded prompts)


def kwargs(tokenizer, eos, suppress, **kw):
    return dict(dict(num_generations=3, max_new_tokens=10, temperature=1.0, eos_token_ids=eos, suppress_token_ids=suppress,
                     pad_token_id=tokenizer.pad_token_id), **kw)


def rollouts(model, batch, decode, kw):
    """greedy, then seeded sampling with top-k / top-p, then per-prompt counts with a repetition penalty"""
    out = [sample_completions(model, batch, greedy=True, decode=decode, **kw)]
    torch.manual_seed(5)
    out.append(sample_completions(model, batch, decode=decode, **dict(kw, top_k=20, top_p=0.9, temperature=0.7)))
    torch.manual_seed(6)
    out.append(sample_completions(model, batch, decode=decode, **dict(kw, num_generations=[2, 3], repetition_penalty=1.3)))
    return out


def test_compile_rollout_flag(tmp_path):
    assert [rollout_decode(f, "cpu") for f in ("auto", "on", "off")] == ["eager", "compiled", "eager"]
    assert [rollout_decode(f, "cuda") for f in ("auto", "on", "off")] == ["compiled", "compiled", "eager"]
    with pytest.raises(ModelError, match="--compile_rollout 'yes'"):
        rollout_decode("yes", "cpu")
    cfg = train.parse_config(["--tiny", "--output_dir", str(tmp_path), "--compile_rollout", "yes"])
    with pytest.raises(train.ConfigError, match=re.escape("--compile_rollout 'yes'")):
        train.validate_config(cfg)
    with pytest.raises(SystemExit):
        evaluate.parse_config(["--tiny", "--compile_rollout", "yes"])
    assert evaluate.parse_config(["--tiny", "--compile_rollout", "off"]).compile_rollout == "off"


def test_static_cache_rollout_equals_eager(tiny_setup):
    # the static cache and decode_step, not compiled: same tokens as the reference loop, greedy and seeded
    tokenizer, model, batch, eos, suppress = tiny_setup
    kw = kwargs(tokenizer, eos, suppress)
    for ref, static in zip(rollouts(model, batch, "eager", kw), rollouts(model, batch, "static", kw)):
        assert torch.equal(static, ref)
    # EOS: a row that ends early is padded after its EOS, and the rollout stops when every row has ended
    first = sample_completions(model, batch, greedy=True, **kw)[:, 3].tolist()   # the 4th greedy token of each row
    kw_eos = dict(kw, eos_token_ids=eos + first)
    ref, static = (sample_completions(model, batch, greedy=True, decode=d, **kw_eos) for d in ("eager", "static"))
    assert torch.equal(static, ref) and static.size(1) == 4


def test_compiled_rollout_equals_eager_and_reads_the_current_weights(tiny_setup):
    # one compiled graph for the whole test (same shapes throughout): the tokens of the eager loop, greedy and seeded;
    # then weights changed in place and by swapping p.data (as ZeRO-3's gather does) must change the compiled rollout
    # the way they change the eager one, with no recompilation (the step reads the weights, it holds no copy)
    from torch._dynamo.utils import counters
    tokenizer, model, batch, eos, suppress = tiny_setup
    model = copy.deepcopy(model)
    kw = kwargs(tokenizer, eos, suppress)
    for ref, compiled in zip(rollouts(model, batch, "eager", kw), rollouts(model, batch, "compiled", kw)):
        assert torch.equal(compiled, ref)
    graphs = counters["stats"]["unique_graphs"]
    before = sample_completions(model, batch, greedy=True, decode="compiled", **kw)
    with torch.no_grad():
        model.lm_head.weight[suppress] *= 50  # in place: the vision tokens become the most likely, and stay suppressed
        model.model.language_model.norm.weight.mul_(-1)  # in place: every logit flips sign
    after = sample_completions(model, batch, greedy=True, decode="compiled", **kw)
    assert not torch.equal(after, before) and not torch.isin(after, torch.tensor(suppress)).any()
    assert torch.equal(after, sample_completions(model, batch, greedy=True, **kw))
    weight = model.model.language_model.layers[1].mlp.down_proj.weight
    weight.data = torch.randn_like(weight) * 0.5  # a new tensor behind the same Parameter
    swapped = sample_completions(model, batch, greedy=True, decode="compiled", **kw)
    assert not torch.equal(swapped, after)
    assert torch.equal(swapped, sample_completions(model, batch, greedy=True, **kw))
    assert counters["stats"]["unique_graphs"] == graphs, "a weight change recompiled the step"


def test_decode_step_logits_equal_the_eager_forward(tiny_setup):
    # tokens can hide a small error (a stray cache slot, a position off by one in one axis): compare the logits of
    # three steps on the static cache with the model's own forward on the prefill's DynamicCache
    tokenizer, model, batch, eos, suppress = tiny_setup
    cache, _, attention_mask, next_pos = prefill(model, batch, 2)                         # (4, P) mask, (4,) positions
    static = static_cache(model, prefill(model, batch, 2)[0], max_new_tokens=3)
    static_mask = torch.cat([attention_mask, attention_mask.new_ones(4, static.layers[0].max_cache_len - attention_mask.size(1))], 1)
    torch.manual_seed(0)
    for t, token in enumerate(torch.randint(20, 300, (3, 4))):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(4, 1)], 1)
        with torch.no_grad():
            ref = model(input_ids=token[:, None], attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                        position_ids=(next_pos + t).view(1, -1, 1).expand(3, -1, 1)).logits[:, -1]  # (4, V)
            ours = decode_step(model, token, next_pos + t, static_mask, static)                   # (4, V)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def bf16_ulp(x):
    """The spacing of bf16 numbers at |x| (8 significant bits): 2^(floor(log2 |x|) - 7); at |x| in [4, 8) 1/32."""
    return 2.0 ** (torch.floor(torch.log2(x.abs().float())) - 7)


def ulps_apart(logits, ref):
    """|log_softmax(logits) - log_softmax(ref)| in bf16 ulps at the scale of each row of ref (its largest |logit|).
    (..., V), (..., V) -> (..., V)"""
    ulp = bf16_ulp(ref.abs().amax(-1, keepdim=True))                                       # (..., 1)
    return (torch.log_softmax(logits.float(), -1) - torch.log_softmax(ref.float(), -1)).abs() / ulp


def teacher_forced_logits(step, model, batch, tokens):
    """The logits of `step` (decode_step or its compiled form) at each of T decode steps after one prefill of 2
    completions per prompt, fed `tokens`, the same whatever it predicts: two paths then compare step by step, where
    feeding each its own argmax lets one rounding flip change every later input. (T, B*2) -> (T, B*2, V) fp32"""
    cache, _, mask, next_pos = prefill(model, batch, 2)                                   # (B*2, P) mask, (B*2,)
    cache = static_cache(model, cache, tokens.size(0))
    assert cache.layers[0].keys.size(0) == tokens.size(1), "B*2 rows must be a power of 2 (no padded rows)"
    mask = torch.nn.functional.pad(mask, (0, cache.layers[0].max_cache_len - mask.size(1)), value=1)  # (B*2, L)
    out = []
    with torch.no_grad():
        for t, token in enumerate(tokens):
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's output is cloned, reuse its memory
            out.append(step(model, token, next_pos + t, mask, cache).clone())                  # (B*2, V)
    return torch.stack(out)


@pytest.fixture
def fresh_dynamo():
    """Each compiled case starts and ends with dynamo's caches empty: one graph per case, never the recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("decode", ["eager", "static", "compiled"])
def test_rollout_logps_equal_the_policy_pass(tiny_setup, decode, fresh_dynamo, monkeypatch):
    # the rollout and the loss must see the same positions: the log-prob of each sampled token under the rollout's
    # own logits (prefill, then each decode step) equals completion_logps, the packed policy pass, at the same weights.
    # fp32, two left-padded prompts with videos; a position off anywhere between prefill, decode and packing fails it
    import model as model_lib
    tokenizer, model, batch, eos, suppress = tiny_setup
    seen = []  # the logits each token is drawn from, before suppression (as the policy pass scores them)
    original = model_lib.apply_repetition_penalty
    monkeypatch.setattr(model_lib, "apply_repetition_penalty", lambda logits, *a: seen.append(logits.clone()) or original(logits, *a))
    G, T = 2, 0.7
    torch.manual_seed(3)
    completion_ids = sample_completions(model, batch, **kwargs(tokenizer, eos, [], num_generations=G, max_new_tokens=6,
                                                               temperature=T, decode=decode))  # (B*G, C)
    C = completion_ids.size(1)
    assert len(seen) == C
    rollout = torch.stack([torch.log_softmax(l / T, -1).gather(-1, tok[:, None]).squeeze(-1)
                           for l, tok in zip(seen, completion_ids.T)], dim=1)             # (B*G, C)
    with torch.no_grad():
        policy = model_lib.completion_logps(model, batch, completion_ids, num_generations=G, temperature=T)  # (B*G, C)
    torch.testing.assert_close(policy, rollout, rtol=0, atol=2e-5)


@pytest.mark.parametrize("tiny_setup", ["qwen3_vl"], indirect=True)  # the family where the CPU copy found 216 ulps untaught
def test_compiled_decode_step_bf16_teacher_forced(tiny_setup, fresh_dynamo):
    # test_gpu's bf16 comparison on CPU (inductor's C++ kernels): the compiled step against the eager one, both fed
    # the same 4 tokens per row, every step's log-probs within 8 bf16 ulps at most, 2 on average (docs/gpu.md has
    # the figures); a wrong position, cache slot or mask moves them by whole units
    tokenizer, model, batch, eos, suppress = tiny_setup
    model = copy.deepcopy(model).to(torch.bfloat16)
    batch = dict(batch, pixel_values_videos=batch["pixel_values_videos"].to(torch.bfloat16))
    tokens = torch.randint(20, 300, (4, 4), generator=torch.Generator().manual_seed(0))       # (T, B*G)
    eager = teacher_forced_logits(decode_step, model, batch, tokens)                          # (T, B*G, V)
    compiled = teacher_forced_logits(compiled_decode_step("default"), model, batch, tokens)
    diff = ulps_apart(compiled, eager)                                                         # (T, B*G, V)
    print(f"compiled vs eager, bf16, teacher-forced: max {diff.max():.2f}, mean {diff.mean():.2f} ulps")
    assert diff.max() <= 8 and diff.mean() <= 2, f"max {diff.max():.2f}, mean {diff.mean():.2f} ulps"
    # and the comparison can fail: the step on positions one further (a wrong position) is whole units away
    shifted = teacher_forced_logits(lambda m, tok, pos, *a: decode_step(m, tok, pos + 1, *a), model, batch, tokens)
    assert ulps_apart(shifted, eager).max() > 8
