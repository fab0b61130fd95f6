"""
Tests of bench.py, offline on CPU: the CLI smoke run (every phase of both ways timed, one JSON line), the
Video-R1's first trainer's log-prob pass and the pre-packing ablation against train.py's on the same completions (so the ways compare
equal work), the fixed completion length of both rollouts, the decode measurement on every family, and the 2B/7B and
Qwen2.5-VL 3B/7B shapes against their published sizes. No test asserts a speed (a busy machine makes any timing
anything): the keys, the paths taken and the token counts; the speeds are bench.py's to report.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import bench
import tiny
from model import completion_logps, sample_completions, special_token_ids, use_packed_attention

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("rollout", "ref_logps", "policy_fwd_bwd", "optimizer", "total")


def test_smoke_run_times_every_phase_of_both_ways():
    cmd = [sys.executable, "bench.py", "--shape", "tiny", "--frames", "4", "--num_generations", "2",
           "--completion_tokens", "4", "--repeats", "1", "--device", "cpu", "--decode", "off"]  # decode: its own test
    # one thread: beside other busy processes (pytest -n, a CI neighbour) OpenMP threads spin and run ~4x slower
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1, f"expected one BENCH_JSON line:\n{proc.stdout}"
    result = json.loads(lines[0][len("BENCH_JSON "):])
    assert result["video_grid"] == [2, 20, 28] and result["video_tokens"] == 280  # 4 frames of 280x392
    for way in ("ours", "baseline"):
        assert set(PHASES) <= set(result[way]), f"{way}: {sorted(result[way])}"
        for phase in PHASES:
            assert isinstance(result[way][phase]["time_s"], float), f"{way} {phase}: {result[way][phase]}"
        assert {"tokens_per_s", "tflops"} <= set(result[way]["rollout"]) | set(result[way]["policy_fwd_bwd"])
    assert set(result["speedup"]) == set(PHASES)
    assert result["rollout_decode"] == "eager" and result["completion_tokens"] == 4  # CPU, --compile_rollout auto
    assert "decode_ms_per_token_eager" not in result  # --decode off


def test_ours_times_train_py_own_step_functions(monkeypatch):
    # no copy of the step in bench.py: ours' phases are train.rollout, train.reference_logps and train.policy_update
    # (its engine's step timed apart as the optimizer phase), each called once per step, warm-up included
    import train
    calls = []
    for name in ("rollout", "reference_logps", "policy_update"):
        monkeypatch.setattr(train, name, lambda *a, _f=getattr(train, name), _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    result = bench.main(["--shape", "tiny", "--frames", "4", "--num_generations", "2", "--completion_tokens", "3",
                         "--repeats", "1", "--device", "cpu", "--only", "ours", "--decode", "off", "--threads", "1"])
    assert calls == ["rollout", "reference_logps", "policy_update"] * 2, calls
    assert set(PHASES) <= set(result["ours"]) and all(result["ours"][p]["time_s"] > 0 for p in PHASES)
    assert not torch.distributed.is_initialized()  # the one-process group bench opened for the step is closed again


@pytest.fixture(scope="module")
def tiny_setup():
    tokenizer = tiny.build_tiny_tokenizer()
    model = use_packed_attention(tiny.build_tiny_model(tokenizer, seed=0, init_std=0.2).eval())  # context-sensitive: see tiny.py
    batch = bench.build_batch(tokenizer, frames=2, prompts=2, device=torch.device("cpu"), seed=0)
    eos, vision = special_token_ids(tokenizer)
    return tokenizer, model, batch, eos, vision


def test_baseline_and_per_completion_logps_equal_ours(tiny_setup):
    tokenizer, model, batch, eos, _ = tiny_setup
    G, C = 3, 5
    torch.manual_seed(1)
    completion_ids = torch.randint(20, len(tokenizer), (2 * G, C))  # (B*G, C), ordinary tokens (the special ones are 0-13)
    with torch.no_grad():
        ours = completion_logps(model, batch, completion_ids, num_generations=G, temperature=1.0)
        first = bench.baseline_logps(model, batch, completion_ids, num_generations=G)
        unpacked = bench.per_completion_logps(model, batch, completion_ids, num_generations=G, temperature=1.0)
    assert ours.shape == first.shape == unpacked.shape == (2 * G, C)
    torch.testing.assert_close(first, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpacked, ours, rtol=1e-5, atol=1e-5)


def test_both_rollouts_give_exactly_the_asked_length(tiny_setup):
    tokenizer, model, batch, eos, vision = tiny_setup
    G, C = 2, 6
    never = vision + eos  # as bench.main: EOS is never sampled, so lengths are fixed
    ours = sample_completions(model, batch, num_generations=G, max_new_tokens=C, temperature=1.0, eos_token_ids=eos,
                                    suppress_token_ids=never, pad_token_id=tokenizer.pad_token_id)
    first = bench.baseline_rollout(model, batch, num_generations=G, max_new_tokens=C, eos_token_ids=eos,
                                  suppress_token_ids=never, pad_token_id=tokenizer.pad_token_id)
    for ids in (ours, first):
        assert ids.shape == (2 * G, C)
        assert not torch.isin(ids, torch.tensor(never)).any()


@pytest.mark.parametrize("shape, billions, vocab, tied", [("2b", 2.21, 151936, True), ("7b", 8.29, 152064, False),
                                                         ("2.5-3b", 3.75, 151936, True), ("2.5-7b", 8.29, 152064, False)])
def test_real_shapes_have_the_published_size(shape, billions, vocab, tied):
    # built on the meta device: the shapes without the memory; the model cards give 2.21B and 8.29B parameters
    tokenizer = tiny.build_tiny_tokenizer()
    model = bench.build_model(shape, tokenizer, torch.device("meta"), torch.bfloat16, "sdpa")
    counts = bench.parameter_counts(model)
    assert round(counts["total"] / 1e9, 2) == billions
    # the same ViT per family (Qwen2.5-VL's: SwiGLU, RMSNorm); its merger maps to the language model's width
    assert round((counts["vision"] + counts["merger"]) / 1e6) == {"2b": 665, "7b": 676, "2.5-3b": 669, "2.5-7b": 677}[shape]
    assert model.config.text_config.vocab_size == vocab and (counts["head"] == 0) == tied
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>") < vocab
    # --layers: a thin slice at the same widths
    thin = bench.build_model(shape, tokenizer, torch.device("meta"), torch.bfloat16, "sdpa", layers=2)
    assert len(thin.model.language_model.layers) == len(thin.model.visual.blocks) == 2
    assert thin.config.text_config.hidden_size == model.config.text_config.hidden_size
    assert thin.model.language_model.config._attn_implementation == "packed_sdpa"


def test_temporal_contrast_times_the_tgrpo_way_and_reports_its_added_cost():
    cmd = [sys.executable, "bench.py", "--shape", "tiny", "--frames", "4", "--num_generations", "2",
           "--completion_tokens", "4", "--repeats", "1", "--device", "cpu", "--only", "ours", "--temporal_contrast",
           "--decode", "off"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("BENCH_JSON "))[len("BENCH_JSON "):])
    assert result["temporal_contrast"] and "baseline" not in result
    for phase in PHASES:
        assert result["tgrpo_added_s"][phase] == pytest.approx(result["tgrpo"][phase]["time_s"] - result["ours"][phase]["time_s"])
    assert "T-GRPO adds" in proc.stdout


def test_memory_estimate_counts_what_trains():
    # the LoRA column's trainable parameters against peft's own count on the same model (2B widths, 2 layers); the
    # sharded terms against the parameter count
    from model import add_lora
    tokenizer = tiny.build_tiny_tokenizer()
    model = bench.build_model("2b", tokenizer, torch.device("meta"), torch.bfloat16, "sdpa", layers=2)
    N = sum(p.numel() for p in model.parameters())
    kw = dict(world=4, B=1, G=8, P=1179, C=512)
    full, lora = bench.memory_per_gpu(model, lora_rank=0, **kw), bench.memory_per_gpu(model, lora_rank=16, **kw)
    peft_model = add_lora(model, rank=16, alpha=32.0, target_modules="")
    assert lora["trainable parameters"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert full["trainable parameters"] == N
    assert full["AdamW fp32 master + m + v, sharded"] * 2**30 == 12 * N / 4
    assert full["weights (policy + reference), sharded"] == pytest.approx(2 * lora["weights (policy + reference), sharded"], rel=0.01)
    # the whole (vocabulary x width) weight gradients: three at once when tied (2B), one when untied (7B), none with LoRA
    V, d = model.config.text_config.vocab_size, model.config.text_config.hidden_size
    assert full["LM head / embedding weight gradient, whole"] * 2**30 == 3 * V * d * 2 and lora["LM head / embedding weight gradient, whole"] == 0
    # the kept static cache of the compiled rollout: 8 rows, 1,691 positions padded to 2,048 (decode.decode_shape), K and V
    kv = model.config.text_config.num_key_value_heads * model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert full["static KV caches kept (compiled rollout)"] * 2**30 == 2 * 2 * kv * 2 * 8 * 2048
    assert bench.memory_per_gpu(model, lora_rank=0, decode_caches=3, **kw)["static KV caches kept (compiled rollout)"] == \
        3 * full["static KV caches kept (compiled rollout)"]
    untied = bench.build_model("7b", tokenizer, torch.device("meta"), torch.bfloat16, "sdpa", layers=2)
    V, d = untied.config.text_config.vocab_size, untied.config.text_config.hidden_size
    assert bench.memory_per_gpu(untied, lora_rank=0, **kw)["LM head / embedding weight gradient, whole"] * 2**30 == V * d * 2
    # short completions: the whole weight gradients decide the policy pass's peak; tied, the three at the embedding's
    # backward; untied, one beside the logits' gradient at the LM head's
    short = dict(kw, C=8)
    for net, weight_grads in ((model, 3 * 2 * model.config.text_config.vocab_size * model.config.text_config.hidden_size),
                              (untied, 2 * V * d)):
        terms = bench.memory_per_gpu(net, lora_rank=0, **short)
        logits, act = terms["logits and their gradient (policy pass)"], terms["activations (policy pass, checkpointed)"]
        expected = act + (weight_grads / 2**30 if net is model else logits / 2 + weight_grads / 2**30)
        assert bench.policy_pass_peak(net, terms) == pytest.approx(expected)


def test_peak_memory_during_sees_what_a_call_allocates_and_frees():
    # check_memory's instrument: a 256 MiB tensor made and freed inside the call is its peak, within the sampling's
    # and the interpreter's noise; nothing of it stays
    def allocate():
        x = torch.ones(64 * 2**20)  # 256 MiB of fp32, written (resident)
        time.sleep(0.05)
        return float(x[-1])
    before = bench.rss_anon()
    assert bench.peak_memory_during(allocate)[1] == pytest.approx(256 * 2**20, rel=0.15)
    assert bench.rss_anon() - before < 32 * 2**20


def test_decode_measurement_reports_each_path():
    # bench's decode columns, without the compiled path (test_rollout_compile.py compiles; CI pays for it once)
    tokenizer = tiny.build_tiny_tokenizer()
    model = bench.build_model("tiny", tokenizer, torch.device("cpu"), torch.float32, "sdpa")
    batch = bench.build_batch(tokenizer, frames=4, prompts=1, device=torch.device("cpu"), seed=0)
    eos, vision = special_token_ids(tokenizer)
    result, tables = bench.measure_decode(model, batch, G=2, C=8, eos=eos, never=vision + eos, pad_token_id=tokenizer.pad_token_id,
                                          device=torch.device("cpu"), repeats=1, decodes=("eager", "static"))
    assert set(tables) == {"eager", "static"} and result["decode_tokens"] == 8 and "prefill_s" in result
    for decode in ("eager", "static"):
        # the ms a token are a difference of two timings: any sign on a busy machine; the op counts are exact
        assert f"decode_ms_per_token_{decode}" in result and result[f"ops_per_token_{decode}"] > 0
    assert "decode_ms_per_token_compiled" not in result and "decode_speedup" not in result


@pytest.mark.parametrize("tiny_model", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_main_measures_decode_on_every_family(tiny_model, capsys):
    # bench.main with the decode measurement on, each family's tiny model: its batch is built with the family's patches
    # (Qwen3-VL's 16-px ones: built as Qwen2-VL's, the vision tower could not reshape them); compiled paths: see
    # test_rollout_compile.py
    result = bench.main(["--shape", "tiny", "--tiny_model", tiny_model, "--frames", "4", "--num_generations", "2",
                         "--completion_tokens", "4", "--repeats", "1", "--device", "cpu", "--only", "ours",
                         "--decode", "eager,static"])
    assert result["decode_tokens"] == 4 and result["video_grid"] == [2, 20, 28]  # 4 frames of 280x392 (Qwen3-VL: 320x448)
    measured = ("eager",) if tiny_model == "qwen3.5" else ("eager", "static")  # Qwen3.5 decodes eagerly, static not measured
    for decode in measured:
        assert f"decode_ms_per_token_{decode}" in result and result[f"ops_per_token_{decode}"] > 0
    assert "decode_ms_per_token_compiled" not in result and ("decode_ms_per_token_static" in result) == (len(measured) == 2)
    out = capsys.readouterr().out
    assert "decode (4 tokens" in out and "compiled" not in out.split("decode (4 tokens")[1]


def test_memory_estimate_counts_image_rows(tmp_path, capsys):
    # P is the longer of the video row's prompt and the largest image row's, whose prompt is data.py's own for an image
    # at --image_max_pixels (default 256 merged patches: 448x448, 256 image tokens)
    import numpy as np
    from PIL import Image

    import data
    tokenizer = tiny.build_tiny_tokenizer()
    Image.fromarray(np.zeros((448, 448, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    item = data.VideoPromptDataset([{"video": str(tmp_path / "x.png"), "data_type": "image", "problem":
                                     "How many red objects are in the image?", "solution": ""}], tokenizer, data.VideoSettings())[0]
    assert bench.image_prompt_tokens(tokenizer) == len(item["input_ids"])
    assert bench.image_prompt_tokens(tokenizer) - bench.image_prompt_tokens(tokenizer, image_max_pixels=4 * 28 * 28) == 256 - 4
    big = 4096 * 28 * 28  # 4096 image tokens: longer than the 16-frame video's 1,024
    bench.main(["--shape", "2b", "--memory", "4", "--layers", "1", "--image_max_pixels", str(big)])
    out = capsys.readouterr().out
    assert f"prompt {bench.image_prompt_tokens(tokenizer, 'qwen2_vl', big)} (video row " in out
