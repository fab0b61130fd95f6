"""
What a real run (Qwen2-VL-7B, 4 GPUs) meets that a tiny CPU run would not show by itself: sampling as Video-R1's first trainer sampled
(top-k 50), the untrained embedding rows past the tokenizer, pre-emption under the launcher, checkpoint disk use,
the flash-attn guards, the gathered reference pass, the first ratio of num_iterations > 1, and the causal attention
calls of unpadded batches. Offline on CPU with the tiny model; the trainer runs in subprocesses.
"""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

import checkpoint
import datatools
import model
import train
from test_grpo import NORMAL_IDS, tiny_setup  # noqa: F401 (a fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


# ---------------------------------------------------------------------------------------------------------------
# sampling: top-k / top-p as transformers does it, and never an untrained row

@pytest.mark.parametrize("top_k, top_p", [(50, 1.0), (3, 1.0), (0, 0.9), (0, 0.3), (5, 0.8), (1000, 0.999), (0, 1e-6)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    torch.manual_seed(0)
    logits = torch.randn(6, 400) * 3
    logits[0, :10] = 5.0  # ties at the top
    logits[1, 7] = -float("inf")  # a suppressed token
    expected = logits.clone()
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = model.filter_logits(logits, top_k, top_p)
    assert torch.equal(ours.isinf(), expected.isinf()) and (~ours.isinf()).sum(-1).min() >= 1
    torch.testing.assert_close(ours, expected)


def test_rollout_top_k_one_is_greedy_and_config_defaults_are_video_r1s(tiny_setup):  # noqa: F811
    tokenizer, net, batch, eos, suppress = tiny_setup
    kwargs = dict(num_generations=2, max_new_tokens=8, temperature=1.0, eos_token_ids=eos, suppress_token_ids=suppress,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    greedy = model.sample_completions(net, batch, greedy=True, **kwargs)
    assert torch.equal(model.sample_completions(net, batch, top_k=1, **kwargs), greedy)
    assert torch.equal(model.sample_completions(net, batch, top_p=1e-6, **kwargs), greedy)
    assert not torch.equal(model.sample_completions(net, batch, **kwargs), greedy)  # off by default: full vocabulary
    cfg = train.parse_config([])
    assert (cfg.top_k, cfg.top_p) == (50, 1.0)


def test_untrained_vocabulary_rows_are_never_sampled(tiny_setup):  # noqa: F811
    tokenizer, net, batch, eos, _ = tiny_setup
    big = copy.deepcopy(net)
    big.resize_token_embeddings(len(tokenizer) + 64)  # as Qwen2-VL: more embedding rows than tokenizer ids
    with torch.no_grad():
        big.lm_head.weight[len(tokenizer):] = big.lm_head.weight[NORMAL_IDS] * 50  # the untrained rows most likely
    vocab = big.config.text_config.vocab_size
    assert vocab == len(tokenizer) + 64
    kwargs = dict(num_generations=4, max_new_tokens=12, temperature=1.0, eos_token_ids=eos,
                  pad_token_id=tokenizer.pad_token_id)
    _, vision_only = model.special_token_ids(tokenizer)
    torch.manual_seed(0)
    assert (model.sample_completions(big, batch, suppress_token_ids=vision_only, **kwargs) >= len(tokenizer)).any()
    _, suppress = model.special_token_ids(tokenizer, vocab)
    ids = model.sample_completions(big, batch, suppress_token_ids=suppress, **kwargs)
    assert ids.max() < len(tokenizer) and not torch.isin(ids, torch.tensor(vision_only)).any()


# ---------------------------------------------------------------------------------------------------------------
# GPU-path guards, on CPU: flash_attn present or broken is simulated in sys.modules

def test_auto_attention_picks_flash_only_in_bf16_when_it_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # "installed and importable"
    assert model.vision_attention("auto", "cuda", bf16=True) == "flash_attention_2"
    assert model.vision_attention("auto", "cuda", bf16=False) == "sdpa"  # flash-attn has no fp32 kernel
    assert model.vision_attention("auto", "cpu", bf16=True) == "sdpa"
    assert model.vision_attention("flash_attention_2", None, bf16=True) == "flash_attention_2"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # found on disk but its import fails (a wheel for another torch)
    assert model.vision_attention("auto", "cuda", bf16=True) == "sdpa"
    with pytest.raises(model.ModelError, match="flash_attn does not import.*requirements-gpu.txt.*sdpa"):
        model.vision_attention("flash_attention_2", "cuda", bf16=True)


@pytest.mark.parametrize("flags, message, flash_imports", [
    (["--attn_implementation", "flash_attention_2", "--no-bf16"], "flash-attn has no fp32 kernel", True),
    (["--attn_implementation", "flash_attention_2", "--bf16"], "flash_attn does not import", False),
    (["--save_total_limit", "0"], "keep at least 1 training state", True),
    (["--save_model_limit", "-1"], "--save_model_limit -1 must be >= 0", True),
    (["--top_k", "-1"], "--top_k -1", True),
    (["--top_p", "0"], "0 < top_p <= 1", True),
])
def test_bad_flags_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, flags, message, flash_imports):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn") if flash_imports else None)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--tiny", "--output_dir", str(out), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and message in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints on disk

def test_save_model_limit_rotates_model_files_never_a_training_state(tmp_path):
    for step in (10, 20, 30, 40):
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        (folder / "model.safetensors").write_text("w")
        (folder / "sub" / "x").write_text("x")
        if step >= 30:  # the training states --save_total_limit 2 keeps
            (folder / checkpoint.STATE).mkdir()
            (folder / checkpoint.STATE / "trainer_state.json").write_text("{}")
    (tmp_path / "final").mkdir()
    checkpoint.rotate_models(str(tmp_path), 0)  # 0: keep all
    assert len(list(tmp_path.glob("checkpoint-*/model.safetensors"))) == 4
    checkpoint.rotate_models(str(tmp_path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-30", "checkpoint-40", "final"]
    assert os.listdir(tmp_path / "checkpoint-30") == [checkpoint.STATE]  # the older resume point keeps its state
    assert sorted(os.listdir(tmp_path / "checkpoint-40")) == ["model.safetensors", "sub", checkpoint.STATE]
    assert checkpoint.find(str(tmp_path), "latest").endswith("checkpoint-40")


# ---------------------------------------------------------------------------------------------------------------
# the model passes: the first old-policy ratio, and the causal calls of unpadded batches

def test_old_logps_equal_policy_pass_exactly(tiny_setup):  # noqa: F811
    # train.py's old-policy log-probs: the policy pass itself under no_grad, the model in train mode (as for the update)
    tokenizer, net, batch, eos, _ = tiny_setup
    net = copy.deepcopy(net).train()
    torch.manual_seed(1)
    completion_ids = torch.randint(NORMAL_IDS, 400, (2 * 3, 7))
    with torch.no_grad():
        old = model.completion_logps(net, batch, completion_ids, num_generations=3, temperature=0.7)
    logps = model.completion_logps(net, batch, completion_ids, num_generations=3, temperature=0.7)
    assert torch.equal(torch.exp(logps - old), torch.ones_like(old))
    _, stats = train.grpo_loss(logps, old, None, torch.randn(6), torch.ones(6, 7),
                               train.LossSettings(beta=0.0, epsilon_low=1e-9, epsilon_high=1e-9, max_completion_length=7))
    assert stats["clip_ratio"] == 0.0


def test_unpadded_packed_attention_causal_calls_equal_masked():
    # one prompt per GPU: no left padding, so packed = (P, C) and sdpa runs causal (the completion block aligned
    # bottom-right) with no boolean mask; the masked path is the reference. float64, GQA, B > 1, C > 1
    torch.manual_seed(0)
    B, H, H_kv, d, P, G, C = 2, 4, 2, 8, 5, 3, 4
    q, (k, v) = torch.randn(B, H, P + G * C, d, dtype=torch.float64), torch.randn(2, B, H_kv, P + G * C, d, dtype=torch.float64)
    masked, _ = model.packed_attention(None, q, k, v, None, scaling=0.3,
                                       packed=model.packed_masks(torch.ones(B, P, dtype=torch.long), G, C))
    causal, _ = model.packed_attention(None, q, k, v, None, scaling=0.3, packed=(P, C))
    torch.testing.assert_close(causal, masked, rtol=1e-12, atol=1e-12)


def test_unpadded_batch_logps_equal_the_padded_path(tiny_setup):  # noqa: F811
    # the first prompt of tiny_setup alone has no padding: completion_logps takes the causal path; forcing the masked
    # path (as a padded batch would) gives the same log-probs
    tokenizer, net, batch, eos, _ = tiny_setup
    net = copy.deepcopy(net).double()
    n = int(batch["video_grid_thw"][0].prod())
    keep = batch["attention_mask"][0].bool()
    one = {"input_ids": batch["input_ids"][:1, keep], "attention_mask": batch["attention_mask"][:1, keep],
           "mm_token_type_ids": batch["mm_token_type_ids"][:1, keep], "video_grid_thw": batch["video_grid_thw"][:1],
           "pixel_values_videos": batch["pixel_values_videos"][:n].double(),
           **{k: batch[k][:1] for k in ("second_per_grid_ts",) if k in batch}}  # Qwen2.5-VL's time per patch
    completion_ids = torch.randint(NORMAL_IDS, 400, (3, 5))
    calls = []
    original = model.packed_attention

    def spy(*args, packed=None, **kwargs):
        calls.append(packed is not None and not torch.is_tensor(packed[0]))
        return original(*args, packed=packed, **kwargs)

    from transformers import AttentionInterface
    AttentionInterface.register("packed_sdpa", spy)
    try:
        causal = model.completion_logps(net, one, completion_ids, num_generations=3, temperature=1.0)
        C = 5
        masks = model.packed_masks(one["attention_mask"], 3, C)
        AttentionInterface.register("packed_sdpa", lambda *a, packed=None, **kw: original(*a, packed=masks if packed else None, **kw))
        masked = model.completion_logps(net, one, completion_ids, num_generations=3, temperature=1.0)
    finally:
        AttentionInterface.register("packed_sdpa", original)
    assert calls and all(calls), "an unpadded batch should take the causal path"
    torch.testing.assert_close(causal, masked, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# the trainer, in subprocesses

@pytest.fixture(scope="module")
def setup(tmp_path_factory, warm_tiny_model):
    root = tmp_path_factory.mktemp("realrun")
    warm_tiny_model(root / "model")  # warm-started: the format reward varies within a group, advantages != 0
    train_path, _ = datatools.make_synthetic_dataset(str(root / "synthetic"), n_train=12, n_test=1)
    return root, str(root / "model"), str(train_path)


def common(setup, out, *extra):
    root, model_dir, train_path = setup
    return ["--tiny", "--model_name_or_path", model_dir, "--data", train_path, "--output_dir", str(out),
            "--num_generations", "4", "--prompts_per_device", "1", "--max_completion_length", "16",
            "--log_samples_steps", "0", *extra]


def deepspeed_cmd():
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", port, "train.py"]


def run(cmd, expect=0):
    proc = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# train.main, with the rollout's sampling settings printed (to check that the flags reach it)
SPY_SCRIPT = """
import sys, model, train
sample = model.sample_completions
def spy(*args, **kwargs):
    print("rollout top_k", kwargs["top_k"], "top_p", kwargs["top_p"], flush=True)
    return sample(*args, **kwargs)
model.sample_completions = spy
train.main(sys.argv[1:])
"""


def test_first_inner_update_has_no_clipping(setup):
    # num_iterations 2 at learning rate 0: both inner updates see the old policy's weights, so every ratio must be
    # exactly 1; clip ranges of 1e-9 turn any rounding difference between the old and the policy pass into clipping
    out = setup[0] / "mu2"
    proc = run([sys.executable, "-c", SPY_SCRIPT, *common(
        setup, out, "--num_iterations", "2", "--learning_rate", "0", "--beta", "0", "--epsilon_low", "1e-9",
        "--epsilon_high", "1e-9", "--max_steps", "1", "--save_steps", "0", "--num_workers", "0", "--prompts_per_device", "2",
        "--top_k", "40", "--top_p", "0.95")])
    assert [r["clip_ratio"] for r in metrics(out)] == [0.0]  # today's code: 0.025 (the old pass was another path)
    assert proc.stdout.count("rollout top_k 40 top_p 0.95") == 1


def test_reference_gathered_once_gives_the_same_kl(setup):
    # ZeRO-3 on 2 ranks: the reference pass with its weights gathered once (default) or layer by layer gives the same
    # numbers; step 2's KL is that of an updated policy to the reference
    rows = {}
    for flag in ("--gather_reference", "--no-gather_reference"):
        out = setup[0] / f"ref{flag}"
        run([*deepspeed_cmd(), *common(setup, out, flag, "--max_steps", "2", "--save_steps", "0", "--num_workers", "0",
                                       "--learning_rate", "1e-2")])
        rows[flag] = metrics(out)
    gathered, layered = rows.values()
    assert gathered[1]["kl"] > 0
    for a, b in zip(gathered, layered):
        assert (a["kl"], a["loss"], a["reward"]) == (b["kl"], b["loss"], b["reward"]), (a, b)


# a rank that exits while a worker is blocked writing a batch it will never read (the loader not shut down first)
STUCK_WORKER_SCRIPT = """
import torch, data
class Big(torch.utils.data.Dataset):
    def __len__(self): return 100
    def __getitem__(self, i): return torch.zeros(512, 1024)  # 2 MB a sample: more than a pipe holds
batches = data.batches_from(Big(), (0, 0), dict(num_workers=1), seed=0, rank=0, world=1, batch_size=2)
next(batches)
cycle = [batches]; cycle.append(cycle)  # nothing frees the loader before the interpreter exits
"""


def test_rank_exits_although_its_workers_ignore_sigterm():
    # multiprocessing ends its children at exit with SIGTERM, then joins them: a worker that ignores SIGTERM hung the
    # rank forever (seen in the SIGTERM test below); data.kill_workers SIGKILLs them first
    proc = subprocess.run([sys.executable, "-c", STUCK_WORKER_SCRIPT], cwd=HERE, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sigterm_to_the_deepspeed_launcher_saves_and_resumes(setup):
    # the scheduler's way: SIGTERM to the launcher's whole process group (launcher, ranks and DataLoader workers).
    # The workers ignore it, the ranks finish the step, save and exit; --resume_from latest continues
    out = setup[0] / "term"
    cmd = [*deepspeed_cmd(), *common(setup, out, "--max_steps", "30", "--save_steps", "0", "--num_workers", "1")]
    proc = subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not open(out / "metrics.jsonl").read().strip():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert "killed by signal" not in stdout, stdout[-3000:]
    assert "SIGTERM: saved" in stdout, stdout[-3000:]
    saved = checkpoint.complete_checkpoints(str(out))
    assert len(saved) == 1, stdout[-3000:]
    step = int(saved[0].rsplit("-", 1)[1])
    assert step < 30 and not (out / "final").exists()
    run([*deepspeed_cmd(), *common(setup, out, "--max_steps", str(step + 2), "--save_steps", "0", "--num_workers", "1",
                                   "--resume_from", "latest")])
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3)) and (out / "final").exists()
