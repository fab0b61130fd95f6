"""
Tests of the GRPO math and the model passes in train.py, offline on CPU with the tiny random Qwen2-VL.

The math is checked against naive loops written from the formulas (values and gradients); the fast model passes
(video encoded once, prompt prefilled once) against slow ones (video repeated G times, transformers' own
positions and generate); and the whole trainer by subprocess runs.
"""
import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import datatools
import runtime
import tiny
import train
from model import (VISION_TOKENS, ModelError, add_lora, completion_logps, completion_logps_shared_prompt, load_model,
                   lora_targets, packed_attention, packed_masks, reference, sample_completions, selective_log_softmax,
                   use_packed_attention, vision_attention)
from model import apply_repetition_penalty, completion_mask, generation_repetition_penalty
from test_positions import reference_positions

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


def naive_loss(logps, old_logps, ref_logps, adv, mask, beta, eps_low, eps_high, loss_type, max_len, cispo_max=5.0,
               keep=None, tau_pos=1.0, tau_neg=1.05):
    N, T = logps.shape
    terms = [[None] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            old = logps[i, t].detach() if old_logps is None else old_logps[i, t]
            ratio = torch.exp(logps[i, t] - old)
            if loss_type == "cispo":  # MiniMax-M1: sg(min(ratio, eps_max)) * A * log pi
                term = -float(min(ratio.item(), cispo_max)) * adv[i] * logps[i, t]
            elif loss_type == "sapo":  # the SAPO paper's soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau
                tau = tau_pos if adv[i] > 0 else tau_neg
                term = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv[i]
            else:
                term = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[i])
            if keep is not None and not keep[i][t]:  # a low-entropy token: no policy term
                term = term * 0
            if beta != 0:
                d = ref_logps[i, t] - logps[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            terms[i][t] = term * mask[i, t]
    if loss_type in ("grpo", "sapo"):
        rows = []
        for i in range(N):
            n = int(mask[i].sum())
            rows.append(sum(terms[i]) / n if n > 0 else torch.zeros(()))
        return sum(rows) / N
    total = sum(terms[i][t] for i in range(N) for t in range(T))
    if loss_type in ("dapo", "cispo"):
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
    assert completion_mask(ids, eos).tolist() == expected


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo", "sapo"])
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
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T,
              cispo_epsilon_max=1.3)  # cispo: a cap the off-policy ratios pass
    loss, stats = train.grpo_loss(logps, old, ref, adv, mask, train.LossSettings(**kw))
    (grad,) = torch.autograd.grad(loss, logps)
    logps2 = logps.detach().clone().requires_grad_(True)
    ref_loss = naive_loss(logps2, old, ref, adv, mask, beta, 0.2, 0.28, loss_type, T, cispo_max=1.3)
    (ref_grad,) = torch.autograd.grad(ref_loss, logps2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(loss) and grad[2].abs().max() == 0
    if off_policy:  # sapo's gate is soft: no token is clipped
        assert (stats["clip_ratio"] > 0) == (loss_type != "sapo")
    assert (stats["kl"] > 0) == (beta > 0)


def trl_sapo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, beta,
                  importance_sampling_level, sapo_temperature_pos, sapo_temperature_neg):
    """TRL 1.16.0's GRPOTrainer._compute_loss with loss_type="sapo", one token at a time (trl/trainer/grpo_trainer.py
    of the trl-1.16.0 wheel): old log-probs lines 3065-3066; log-ratio and importance weight 3083-3095 (token, or the
    sequence's masked mean log-ratio); k3 KL 3098-3103; the SAPO branch 3121-3124 (temperatures = where(A > 0, pos,
    neg); soft_coef_1 = sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures; per_token_loss = -soft_coef_1 * A);
    + beta * KL 3149-3150; the "grpo"/"sapo" aggregation 3153-3154 (per sequence, then the batch mean)."""
    N, T = per_token_logps.shape
    total = 0
    for i in range(N):
        n_tokens = sum(float(mask[i, t]) for t in range(T))
        log_w_seq = sum((per_token_logps[i, t] - old_per_token_logps[i, t]) * mask[i, t] for t in range(T)) / max(n_tokens, 1.0)
        row = 0
        for t in range(T):
            log_w = per_token_logps[i, t] - old_per_token_logps[i, t] if importance_sampling_level == "token" else log_w_seq
            coef_1 = torch.exp(log_w)
            temperature = sapo_temperature_pos if advantages[i] > 0 else sapo_temperature_neg
            soft_coef_1 = torch.sigmoid(temperature * (coef_1 - 1)) * 4 / temperature
            per_token_loss = -soft_coef_1 * advantages[i]
            if beta != 0.0:
                d = ref_per_token_logps[i, t] - per_token_logps[i, t]
                per_token_loss = per_token_loss + beta * (torch.exp(d) - d - 1)
            row = row + per_token_loss * mask[i, t]
        total = total + row / max(n_tokens, 1.0)
    return total / N


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_sapo_equals_trls_branch_in_float64(level, beta, off_policy):
    g = torch.Generator().manual_seed(4)
    N, T = 6, 7
    logps = (-torch.rand(N, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    # ratios up to e^1.5 either way: the gate's tails, where sigmoid(tau (r - 1)) is far from linear
    old = logps.detach() + (torch.rand(N, T, generator=g, dtype=torch.float64) * 3 - 1.5) if off_policy else None
    ref = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    adv[0] = 0.0  # A = 0 takes the negative temperature in TRL; its term is 0 either way
    mask = (torch.rand(N, T, generator=g) > 0.3).int()
    mask[2] = 0  # a completion with no token: 0, never NaN
    settings = train.LossSettings(loss_type="sapo", beta=beta, importance_sampling_level=level, max_completion_length=T,
                                  sapo_temperature_pos=0.9, sapo_temperature_neg=1.3)
    loss, stats = train.grpo_loss(logps, old, ref, adv, mask, settings)
    logps2 = logps.detach().clone().requires_grad_(True)
    theirs = trl_sapo_loss(logps2, logps2.detach() if old is None else old, ref, adv, mask, beta, level, 0.9, 1.3)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, logps)[0], torch.autograd.grad(theirs, logps2)[0],
                               rtol=1e-12, atol=1e-12)
    assert stats["clip_ratio"] == 0.0


def test_sapo_on_policy_gradient_is_grpos():
    # at ratio 1 the gate's slope is sigmoid'(0) * 4 = 1 at any temperature: SAPO's gradient is GRPO's; off-policy not
    g = torch.Generator().manual_seed(5)
    logps = (-torch.rand(4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv, mask = torch.randn(4, generator=g, dtype=torch.float64), torch.ones(4, 5)
    old = logps.detach() + 0.5
    grads = {}
    for loss_type in ("grpo", "sapo"):
        for name, o in (("on", None), ("off", old)):
            loss, _ = train.grpo_loss(logps, o, None, adv, mask, train.LossSettings(loss_type=loss_type, beta=0.0))
            grads[loss_type, name] = torch.autograd.grad(loss, logps)[0]
    torch.testing.assert_close(grads["sapo", "on"], grads["grpo", "on"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grads["sapo", "off"], grads["grpo", "off"])


def test_help_groups_every_flag_by_topic_with_its_default():
    # --help is a page to scan: train.py's flags under seven topic headings, eval.py's and bench.py's under theirs,
    # every flag's default printed
    import bench
    import eval as eval_script
    topics = ["model", "data and video", "rollout and rewards", "loss", "optimisation", "run and checkpoints", "logging"]
    for cls, headings in ((train.Config, topics), (eval_script.Config, None), (bench.Args, None)):
        parser = runtime.dataclass_parser(cls, "")
        groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups[2:]}
        assert headings is None or list(groups) == headings
        fields = dataclasses.fields(cls)
        assert sorted(d for dests in groups.values() for d in dests) == sorted(f.name for f in fields)
        assert all(f.name in groups[f.metadata["group"]] for f in fields)
        text = " ".join(parser.format_help().split())
        assert text.count("(default: ") == len(fields)
        for f in fields:
            if not isinstance(f.default, dataclasses._MISSING_TYPE) and f.type is not bool:
                shown = "''" if f.default == "" else str(f.default)
                assert f"(default: {shown})" in text, f.name


def test_loss_table_is_what_validation_help_and_docs_list(capsys):
    # one table, train.LOSSES: validate_config refuses a name outside it, --help prints each entry's help, and
    # docs/training.md's `--loss_type` row names exactly its loss types, in its order
    assert train.LOSS_TYPES == tuple(train.LOSSES) and "sapo" in train.LOSSES
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, loss in train.LOSSES.items():
        assert f"{name}: {loss.help}" in shown
    with pytest.raises(train.ConfigError, match="choose one of"):
        train.validate_config(train.Config(loss_type="ppo"))
    text = open(os.path.join(HERE, "docs", "training.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| `--loss_type`")]
    assert len(rows) == 1 and re.findall(r"`(\w+)`: ", rows[0]) == list(train.LOSSES), rows


def test_grpo_loss_all_masked_is_zero_not_nan():
    logps = torch.zeros(2, 3, requires_grad=True)
    for loss_type in train.LOSS_TYPES:
        loss, _ = train.grpo_loss(logps, None, None, torch.ones(2), torch.zeros(2, 3, dtype=torch.int),
                                  train.LossSettings(beta=0.0, loss_type=loss_type, max_completion_length=3))
        assert loss.item() == 0.0


def test_on_policy_gradient_is_the_policy_gradient():
    # with old_logps=None the ratio is 1 but d/dlogp of -ratio*A is -A: the REINFORCE-with-baseline gradient
    logps = torch.zeros(2, 2, requires_grad=True)
    loss, _ = train.grpo_loss(logps, None, None, torch.tensor([1.0, -1.0]), torch.ones(2, 2),
                              train.LossSettings(beta=0.0, loss_type="dapo", max_completion_length=2))
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_cispo_capped_tokens_keep_their_gradient():
    # where the clipped GRPO objective's gradient is 0 (ratio past 1 + eps, A > 0), CISPO's is -min(ratio, cap) * A / n
    logps, old = torch.zeros(1, 2, requires_grad=True), torch.tensor([[-1.0, -3.0]])  # ratios e, e^3 = 20.1
    for loss_type, expected in (("dapo", [0.0, 0.0]), ("cispo", [-math.e / 2, -5.0 / 2])):
        loss, stats = train.grpo_loss(logps, old, None, torch.ones(1), torch.ones(1, 2),
                                      train.LossSettings(beta=0.0, loss_type=loss_type, max_completion_length=2))
        torch.testing.assert_close(torch.autograd.grad(loss, logps)[0], torch.tensor([expected]))
    assert stats["clip_ratio"] == 0.5  # cispo: the share of tokens whose weight the cap bound


def test_cispo_gradient_equals_dapos_at_ratio_one():
    # at num_iterations 1 the ratio is 1: -sg(min(1, cap)) A log pi and -min(r A, clip(r) A) have the same gradient
    # -A / n (the values differ: CISPO's carries log pi), so the tiny runs of the two are equal apart from `loss`
    # (docs/methods.md); with the ratio away from 1 (mu > 1) they part
    g = torch.Generator().manual_seed(6)
    logps = (-torch.rand(5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ref, adv = -torch.rand(5, 6, generator=g, dtype=torch.float64) * 2, torch.randn(5, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 6, generator=g) > 0.2).int()
    off = logps.detach() + torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.5
    out = {}
    for loss_type in ("dapo", "cispo"):
        for name, old in (("none", None), ("equal", logps.detach().clone()), ("off", off)):
            loss, _ = train.grpo_loss(logps, old, ref, adv, mask, train.LossSettings(loss_type=loss_type))
            out[loss_type, name] = loss, torch.autograd.grad(loss, logps)[0]
    for name in ("none", "equal"):
        torch.testing.assert_close(out["cispo", name][1], out["dapo", name][1], rtol=1e-12, atol=1e-12)
        assert (out["cispo", name][0] - out["dapo", name][0]).abs() > 0.1  # the values are not the same
    assert (out["cispo", "off"][1] - out["dapo", "off"][1]).abs().max() > 1e-3


def naive_quantile(values, q):
    """numpy's / torch's default 'linear' quantile, written out: position q * (n - 1) in the sorted values."""
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    return values[lo] + (pos - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 1.0])  # 0: only the highest-entropy token, as TRL allows
def test_high_entropy_mask_matches_the_definition_over_all_ranks(rho):
    # two ranks simulated: the threshold is the (1 - rho) quantile of both ranks' completion tokens, never one rank's
    g = torch.Generator().manual_seed(0)
    ent = [torch.rand(3, 6, generator=g) * 4, torch.rand(2, 9, generator=g)]      # rank 1: low entropies, other shape
    masks = [(torch.rand(3, 6, generator=g) > 0.3).int(), (torch.rand(2, 9, generator=g) > 0.2).int()]
    pooled = [e.item() for ent_r, m in zip(ent, masks) for e, keep in zip(ent_r.flatten(), m.flatten()) if keep]
    threshold = naive_quantile(pooled, 1 - rho)
    all_entropies = torch.cat([e[m.bool()] for e, m in zip(ent, masks)])
    kept = 0
    for ent_r, m in zip(ent, masks):
        ours, ours_threshold = train.high_entropy_mask(ent_r, m, rho, all_entropies)
        naive = [[bool(m[i, t]) and ent_r[i, t].item() >= threshold for t in range(m.size(1))] for i in range(m.size(0))]
        assert ours.tolist() == naive and ours_threshold == pytest.approx(threshold, rel=1e-6)
        kept += int(ours.sum())
    assert abs(kept - rho * len(pooled)) <= 1  # the top rho share of all tokens
    own = train.high_entropy_mask(ent[1], masks[1], 0.2, ent[1][masks[1].bool()])[0]  # rank 1 alone would keep some
    assert own.any() and (rho == 1.0 or not train.high_entropy_mask(ent[1], masks[1], 0.2, all_entropies)[0].any())


def trl_get_high_entropy_mask(entropies, mask, threshold, gather=lambda t: t):
    """TRL 1.16.0's GRPOTrainer.get_high_entropy_mask (trl/trainer/grpo_trainer.py of the trl-1.16.0 wheel, lines
    1380-1416), transcribed so that CI runs the cross-check without installing trl (it pulls datasets, pandas and
    pyarrow). accelerator.pad_across_processes + gather (lines 1404-1405) become `gather`, padding with TRL's -1e9
    sentinel; TRL calls it with threshold = 1 - top_entropy_quantile (line 3050)."""
    local = entropies[mask.bool()].float()                         # line 1397
    pad_value = -1e9                                               # line 1401
    gathered = gather(local)                                       # lines 1404-1405
    gathered = gathered[gathered != pad_value]                     # line 1408
    if gathered.numel() == 0:                                      # lines 1410-1411
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(gathered, threshold)        # line 1413
    masked_entropies = entropies * mask.float()                    # line 1414
    entropy_mask = masked_entropies >= entropy_threshold           # line 1415
    return entropy_mask & mask.bool()                              # line 1416


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5])
def test_high_entropy_mask_equals_trls(rho):
    g = torch.Generator().manual_seed(1)
    entropies, mask = torch.rand(4, 7, generator=g) * 3, (torch.rand(4, 7, generator=g) > 0.3).int()
    other_rank = torch.rand(9, generator=g) * 4                     # a second rank's completion-token entropies
    padded = lambda local: torch.cat([local, other_rank, torch.full((3,), -1e9)])  # gathered, TRL's padding included
    theirs = trl_get_high_entropy_mask(entropies, mask, 1 - rho, gather=padded)
    ours = train.high_entropy_mask(entropies, mask, rho, torch.cat([entropies[mask.bool()], other_rank]))[0]
    assert ours.tolist() == theirs.tolist() and ours.sum() < mask.sum()
    assert (ours.sum() > 0) == (rho > 0)  # rho 0: the one highest entropy of both ranks, here the other rank's
    alone = train.high_entropy_mask(entropies, mask, rho, entropies[mask.bool()])[0]
    assert alone.tolist() == trl_get_high_entropy_mask(entropies, mask, 1 - rho).tolist() and alone.sum() >= 1
    empty = torch.zeros_like(mask)
    assert train.high_entropy_mask(entropies, empty, rho, entropies[empty.bool()])[0].tolist() == \
        trl_get_high_entropy_mask(entropies, empty, 1 - rho).tolist()


def test_trl_transcription_equals_the_installed_trl():
    # where trl is installed (not in CI: requirements.txt leaves it out), the transcription above is checked against it
    trl = pytest.importorskip("trl")
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(1)
    entropies, mask = torch.rand(4, 7, generator=g) * 3, (torch.rand(4, 7, generator=g) > 0.3).int()
    fake = SimpleNamespace(accelerator=SimpleNamespace(pad_across_processes=lambda t, **kw: t, gather=lambda t: t))
    for rho in (0.0, 0.2, 0.5):
        theirs = trl.GRPOTrainer.get_high_entropy_mask(fake, entropies, mask, 1 - rho)
        assert trl_get_high_entropy_mask(entropies, mask, 1 - rho).tolist() == theirs.bool().tolist()


def test_entropy_mask_keeps_the_kl_and_the_token_count():
    torch.manual_seed(2)
    logps, old, ref = -torch.rand(4, 5, requires_grad=True), -torch.rand(4, 5), -torch.rand(4, 5)
    adv, mask, keep = torch.randn(4), (torch.rand(4, 5) > 0.2).int(), torch.rand(4, 5) > 0.6
    for loss_type in train.LOSS_TYPES:
        loss, _ = train.grpo_loss(logps, old, ref, adv, mask,
                                  train.LossSettings(loss_type=loss_type, max_completion_length=5), entropy_mask=keep)
        naive = naive_loss(logps, old, ref, adv, mask, 0.04, 0.2, 0.2, loss_type, 5, keep=keep)
        torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(loss, logps)[0], torch.autograd.grad(naive, logps)[0],
                                   rtol=1e-5, atol=1e-6)


def _dapo_problem():
    """6 completions, 8 tokens, one shared parameter per position; rows 0-2 (rank 0) short, rows 3-5 (rank 1) long."""
    g = torch.Generator().manual_seed(3)
    x, ref, adv = torch.randn(6, 8, generator=g), -torch.rand(6, 8, generator=g), torch.randn(6, generator=g)
    mask = (torch.arange(8)[None] < torch.tensor([1, 2, 1, 8, 7, 8])[:, None]).int()  # 4 tokens vs 23
    return x, ref, adv, mask


def _dapo_grad(x, ref, adv, mask, dapo_tokens):
    theta = torch.linspace(-1, 1, 8).requires_grad_(True)
    logps = -torch.nn.functional.softplus(x * theta[None])                               # (N, T)
    loss, _ = train.grpo_loss(logps, None, ref, adv, mask,
                              train.LossSettings(loss_type="dapo", max_completion_length=8), dapo_tokens=dapo_tokens)
    loss.backward()
    return theta.grad


def _dapo_rank(rank, port, out, use_divisor):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    x, ref, adv, mask = (t[3 * rank:3 * rank + 3] for t in _dapo_problem())             # this rank's half
    divisor = runtime.dapo_divisor(mask, 2) if use_divisor else None
    grad = _dapo_grad(x, ref, adv, mask, divisor)
    torch.distributed.all_reduce(grad)  # DeepSpeed's gradient averaging over ranks
    if rank == 0:
        torch.save(grad / 2, out)
    torch.distributed.destroy_process_group()


def test_dapo_two_ranks_equal_the_whole_batch_token_mean(tmp_path):
    whole = _dapo_grad(*_dapo_problem(), dapo_tokens=None)  # one process holding all 6 completions
    grads = {}
    for use_divisor in (True, False):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = tmp_path / f"grad_{use_divisor}.pt"
        torch.multiprocessing.spawn(_dapo_rank, args=(port, str(out), use_divisor), nprocs=2)
        grads[use_divisor] = torch.load(out)
    torch.testing.assert_close(grads[True], whole, rtol=1e-5, atol=1e-7)
    # each rank's own count (the old behaviour) weighs rank 0's 4 tokens as much as rank 1's 23: not the token mean
    assert (grads[False] - whole).abs().max() > 1e-3


@pytest.mark.parametrize("loss_type", train.LOSS_TYPES)
def test_filler_rows_count_nowhere_for_every_loss_type(loss_type):
    # --dynamic_sampling fills a short batch with uninformative groups (mask 0): the loss, value and gradient, must be the
    # naive loss over the real rows alone. A real row masked for another reason (--mask_truncated_completions, row 1)
    # still counts in grpo's mean over completions, as in TRL
    torch.manual_seed(3)
    N, T = 8, 5
    logps = (-torch.rand(N, T)).requires_grad_(True)
    ref = -torch.rand(N, T)
    adv = torch.randn(N)
    mask = (torch.arange(T)[None] < torch.tensor([3, 0, 5, 2, 4, 1, 5, 3])[:, None]).int()      # (N, T)
    keep = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)                             # rows 4-7: filler
    kw = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T)
    loss, stats = train.grpo_loss(logps, None, ref, adv, mask * keep[:, None].int(), train.LossSettings(**kw),
                                  num_rows=int(keep.sum()))
    naive = naive_loss(logps[keep], None, ref[keep], adv[keep], mask[keep], 0.04, 0.2, 0.28, loss_type, T)
    torch.testing.assert_close(loss, naive)
    grad, = torch.autograd.grad(loss, logps)
    naive_grad, = torch.autograd.grad(naive, logps)
    torch.testing.assert_close(grad, naive_grad)
    assert grad[~keep].abs().sum() == 0
    # the logged kl is a mean over the real tokens only
    kl = train.per_token_kl(logps[keep], ref[keep])
    assert stats["kl"] == pytest.approx(((kl * mask[keep]).sum() / mask[keep].sum()).item())


def _ranks_agree(rank, port, out):
    import datetime
    import types
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    good = {"skipped": [], "solution": ["<answer>1</answer>"]}
    failed = {"skipped": [{"error": "read_video: cannot open /v/1.mp4: no such file", "video": "/v/1.mp4"}], "solution": []}
    batches = iter([(0, i, failed if rank == 1 else good) for i in range(4)])
    run = types.SimpleNamespace(batches=batches, skips=data.SkipSummary(), rank=rank, device=torch.device("cpu"),
                                cfg=types.SimpleNamespace(skip_window=2, prompts_per_device=1))
    result = {}
    try:  # rank 1's examples all fail to load: it raises, and rank 0 must raise with it, not go on to the next collective
        data.next_batch(run)
        result["next_batch"] = "returned"
    except RuntimeError as e:
        result["next_batch"] = str(e)
    try:  # a reward that raises on rank 0 inside the resample loop (runtime.together): both raise
        runtime.together(torch.device("cpu"), lambda: 1 / rank)
        result["together"] = "returned"
    except (RuntimeError, ZeroDivisionError) as e:
        result["together"] = type(e).__name__
    # metrics: a token mean weighted by real tokens (rank 1's mask emptied, its kl 0 must not halve rank 0's)
    result["means"], result["counts"] = runtime.rank_means({"kl": [0.5, 0.0][rank], "reward": [1.0, 0.0][rank]},
                                                           {"kl": [10, 0][rank]}, [rank + 1], torch.device("cpu"))
    result["empty"], _ = runtime.rank_means({"kl": 0.0}, {"kl": 0}, [], torch.device("cpu"))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def _rank_adds_a_metric(rank, port, out):
    import datetime
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    cases = {"added": {"loss": 1.0, "reward": 0.5, **({"rewards/extra": 0.25} if rank == 1 else {})},  # rank 1: one more
             "reordered": {"reward": 0.5, "loss": 1.0} if rank == 0 else {"loss": 1.0, "reward": 0.5},
             "same": {"loss": 1.0, "reward": float(rank)}}
    result = {}
    for name, metrics in cases.items():
        try:
            result[name] = runtime.rank_means(metrics, {}, [1.0], torch.device("cpu"))[0]
        except RuntimeError as e:
            result[name] = str(e)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_metrics_that_differ_across_ranks_raise_on_every_rank_naming_the_key(tmp_path):
    # the metrics all-reduce adds values by position: a key on one rank only would shift every later metric. Every rank
    # raises, naming it (no hang, no silent misalignment); the same names in another order raise too
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_rank_adds_a_metric, args=(port, str(tmp_path / "out")), nprocs=2)
    r0, r1 = (json.load(open(tmp_path / f"out.{r}")) for r in (0, 1))
    for r in (r0, r1):
        assert r["added"] == ("the metrics differ across ranks, so their all-reduce would not line up: rank 1 has "
                              "['rewards/extra'] that not every rank has"), r
        assert "the same names in another order" in r["reordered"], r
        assert r["same"] == {"loss": 1.0, "reward": 0.5}, r


def test_a_rank_that_fails_to_draw_makes_all_raise_and_metrics_weigh_real_tokens(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_ranks_agree, args=(port, str(tmp_path / "out")), nprocs=2)
    r0, r1 = (json.load(open(tmp_path / f"out.{r}")) for r in (0, 1))
    assert "the last 2 examples all failed to load" in r1["next_batch"], r1
    assert "another rank that failed" in r0["next_batch"], r0
    assert (r0["together"], r1["together"]) == ("ZeroDivisionError", "RuntimeError")
    for r in (r0, r1):
        assert r["means"] == {"kl": 0.5, "reward": 0.5} and r["counts"] == [3.0]
        assert math.isnan(r["empty"]["kl"])  # no real token on any rank: not a number, never 0


def test_sequence_mean_kl_is_the_first_trainers_logged_kl():
    torch.manual_seed(2)
    logps, ref = -torch.rand(4, 6) * 3, -torch.rand(4, 6) * 3
    ref[0, 0] = logps[0, 0] + 6.0  # k3 = e^6 - 7 > 100: Video-R1's first trainer clamped it
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    per_seq = []
    for i in range(4):  # Video-R1's first trainer's formula, a loop: clamp, mean over the row's tokens, then over rows
        ks = [min(100.0, math.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1) for t in range(6) if mask[i, t]]
        per_seq.append(float(sum(ks)) / len(ks))
    assert train.sequence_mean_kl(logps, ref, mask) == pytest.approx(sum(per_seq) / 4, rel=1e-5)
    token_mean = (train.per_token_kl(logps, ref).clamp(max=100) * mask).sum() / mask.sum()
    assert abs(train.sequence_mean_kl(logps, ref, mask) - token_mean.item()) > 1  # not our token mean


def test_video_r1_first_metrics():
    import rewards
    good, bare = "<think>a</think><answer>3</answer>", "3"
    m = rewards.video_r1_first_metrics([good, bare, good, good], ["<answer>3</answer>", "<answer>5</answer>"], 2)
    # group 1: 2.0 and 1.0 (a bare "3" is right but unformatted); group 2: 1.0 and 1.0 (format only)
    assert m == {"video_r1_first/reward": 1.25, "video_r1_first/reward_std": pytest.approx(0.5 ** 0.5 / 2),
                 "video_r1_first/rewards/accuracy_reward": 0.5, "video_r1_first/rewards/format_reward": 0.75}
def naive_gspo_loss(logps, old_logps, ref_logps, adv, mask, beta, eps_low, eps_high, loss_type, max_len, kl_clamp=0.0):
    """GSPO from its definition, one completion at a time: s_i = exp(mean over its tokens of (logp - old)), clipped
    as a whole; the k3 KL per token as in GRPO (its log-ratio clamped when kl_clamp > 0)."""
    N, T = logps.shape
    terms = [[torch.zeros(())] * T for _ in range(N)]
    for i in range(N):
        tokens = [t for t in range(T) if mask[i, t]]
        old = [logps[i, t].detach() if old_logps is None else old_logps[i, t] for t in range(T)]
        s = torch.exp(sum(logps[i, t] - old[t] for t in tokens) / len(tokens)) if tokens else torch.ones(())
        policy_term = -torch.minimum(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i])
        for t in tokens:
            term = policy_term
            if beta != 0:
                d = ref_logps[i, t] - logps[i, t]
                d = torch.clamp(d, -kl_clamp, kl_clamp) if kl_clamp > 0 else d
                term = term + beta * (torch.exp(d) - d - 1)
            terms[i][t] = term
    if loss_type == "grpo":
        return sum(sum(terms[i]) / max(int(mask[i].sum()), 1) for i in range(N)) / N
    total = sum(terms[i][t] for i in range(N) for t in range(T))
    return total / max(int(mask.sum()), 1) if loss_type == "dapo" else total / (N * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_gspo_loss_matches_naive_per_sequence_loop(loss_type, beta, off_policy):
    torch.manual_seed(2)
    N, T = 6, 5
    logps = (-torch.rand(N, T) * 2).requires_grad_(True)
    # per-token noise of 1e-3: the sequence ratio leaves GSPO's [1 - 3e-4, 1 + 4e-4] on some completions, not all
    old = (logps.detach() + torch.randn(N, T) * 1e-3) if off_policy else None
    ref = -torch.rand(N, T) * 2 if beta else None
    adv = torch.randn(N)
    mask = (torch.rand(N, T) > 0.3).int()
    mask[2] = 0
    kw = dict(beta=beta, epsilon_low=3e-4, epsilon_high=4e-4, loss_type=loss_type, max_completion_length=T)
    loss, stats = train.grpo_loss(logps, old, ref, adv, mask,
                                  train.LossSettings(importance_sampling_level="sequence", **kw))
    (grad,) = torch.autograd.grad(loss, logps)
    logps2 = logps.detach().clone().requires_grad_(True)
    ref_loss = naive_gspo_loss(logps2, old, ref, adv, mask, beta, 3e-4, 4e-4, loss_type, T)
    (ref_grad,) = torch.autograd.grad(ref_loss, logps2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert grad[2].abs().max() == 0
    if off_policy:  # some completions clipped as a whole, some not: the sequence ratio is what is clipped
        assert 0 < stats["clip_ratio"] < 1
        token, _ = train.grpo_loss(logps, old, ref, adv, mask, train.LossSettings(**kw))
        assert (token - loss).abs() > 1e-7, "the sequence-level loss must differ from the token-level one"


def test_split_rollout_cuts_the_normal_rows_to_their_longest_completion():
    eos, pad = [7], 7
    ids = torch.tensor([[1, 7, pad, pad, pad],    # normal: ends at 2 tokens
                        [1, 2, 3, 7, pad],        # normal: ends at 4 tokens (its EOS kept)
                        [1, 2, 3, 4, 5]])         # shuffled: ran to the limit
    normal, shuffled = train.split_rollout(ids, 2, eos)
    assert normal.tolist() == [[1, 7, pad, pad], [1, 2, 3, 7]] and torch.equal(shuffled, ids[2:])
    assert normal.is_contiguous() and normal.view(1, 8).shape == (1, 8)  # the packed pass views it as (B, G*C)
    assert train.split_rollout(ids, 3, eos)[0].shape == (3, 5) and train.split_rollout(ids, 3, eos)[1].shape == (0, 5)


def test_kl_clamp_clips_the_log_ratio_before_k3():
    torch.manual_seed(0)
    logps = (-torch.rand(4, 6) * 30).requires_grad_(True)  # log-ratios up to ~30: exp would be ~1e13 unclamped
    ref, adv, mask = -torch.rand(4, 6) * 30, torch.randn(4), torch.ones(4, 6)
    kw = dict(beta=0.04, loss_type="grpo", max_completion_length=6)
    for level in ("token", "sequence"):
        loss, stats = train.grpo_loss(logps, None, ref, adv, mask,
                                      train.LossSettings(importance_sampling_level=level, kl_clamp=10.0, **kw))
        (grad,) = torch.autograd.grad(loss, logps)
        logps2 = logps.detach().clone().requires_grad_(True)
        if level == "sequence":
            ref_loss = naive_gspo_loss(logps2, None, ref, adv, mask, 0.04, 0.2, 0.2, "grpo", 6, kl_clamp=10.0)
        else:
            d = torch.clamp(ref - logps2, -10, 10)
            ref_loss = (-adv[:, None] * torch.exp(logps2 - logps2.detach()) + 0.04 * (torch.exp(d) - d - 1)).mean()
        (ref_grad,) = torch.autograd.grad(ref_loss, logps2)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    d = ref - logps.detach()
    assert d.abs().max() > 10 and stats["kl"] <= math.exp(10) - 11 + 1e-3
    unclamped, _ = train.grpo_loss(logps, None, ref, adv, mask, train.LossSettings(**kw))
    assert unclamped > loss, "without the clamp the KL of the far tokens is larger"
    torch.testing.assert_close(train.per_token_kl(logps, ref, clamp=0.0), train.per_token_kl(logps, ref))


def test_lr_factor_linear_and_cosine_match_transformers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    warmup, total = 3, 20
    for kind, hf_schedule in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = hf_schedule(opt, warmup, total)
        ours = [runtime.lr_factor(u, warmup_steps=warmup, total_updates=total, scheduler=kind) for u in range(total + 1)]
        expected = [hf.lr_lambdas[0](u) for u in range(total + 1)]
        # warmup: ours reaches the peak on the last warmup update ((u + 1) / w), transformers' one later (u / w)
        assert ours[:warmup] == [(u + 1) / warmup for u in range(warmup)]
        assert ours[warmup:] == pytest.approx(expected[warmup:], abs=1e-12), kind


def test_selective_log_softmax_matches_log_softmax():
    torch.manual_seed(0)
    logits, index = torch.randn(3, 4, 11), torch.randint(0, 11, (3, 4))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index, 0.7), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_selective_log_softmax_gradient_matches_autograd_and_keeps_only_the_logits(dtype):
    # its own backward equals autograd through log_softmax (fp64: to 1e-12; bf16: the fp32 math rounded once), with
    # repeated indices in a row; and all it keeps for the backward is the logits and one fp32 number per position
    torch.manual_seed(0)
    logits, index = (torch.randn(3, 5, 17, dtype=torch.float64) * 3).to(dtype), torch.randint(0, 17, (3, 5))
    index[0, :3] = 4
    upstream = torch.randn(3, 5, dtype=torch.float64)
    ours_in = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        ours = selective_log_softmax(ours_in, index, 0.7)
    ours.backward(upstream.to(ours.dtype))
    naive_in = logits.double().requires_grad_()
    naive = torch.log_softmax(naive_in / 0.7, -1).gather(-1, index[..., None]).squeeze(-1)
    naive.backward(upstream)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.double(), naive, **tol)
    torch.testing.assert_close(ours_in.grad.double(), naive_in.grad, **tol)
    assert ours.dtype == torch.promote_types(dtype, torch.float32) and ours_in.grad.dtype == dtype
    assert sum(saved) <= logits.nbytes + index.nbytes + 3 * 5 * 8, saved  # no fp32 copy of the (N, T, V) logits
    with torch.no_grad():  # the reference pass: the same numbers without a graph
        torch.testing.assert_close(selective_log_softmax(ours_in, index, 0.7), ours.detach())
    # entropy=True: the same log-probs and gradient, plus -sum p log p of each position, no grad, nothing more saved
    ent_in, saved_ent = logits.detach().clone().requires_grad_(), []  # (fp64: naive_in is logits itself)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_ent.append(t.nbytes) or t, lambda t: t):
        ours_ent, entropy = selective_log_softmax(ent_in, index, 0.7, entropy=True)
    ours_ent.backward(upstream.to(ours.dtype))
    p = torch.softmax(logits.detach().double() / 0.7, -1)
    torch.testing.assert_close(entropy.double(), -(p * p.log()).sum(-1), **tol)
    assert torch.equal(ours_ent, ours.detach()) and torch.equal(ent_in.grad, ours_in.grad)
    assert not entropy.requires_grad and saved_ent == saved


def test_rewards_follow_their_own_prompt():
    # prompts_per_device=2: completions are ordered prompt by prompt, each scored against its own solution
    import rewards
    completions = ["<think></think><answer>3</answer>"] * 3 + ["<think></think><answer>5</answer>"] * 3
    per_reward, total = rewards.compute_rewards([rewards.accuracy_reward, rewards.format_reward], [1.0, 0.5],
                                              completions, ["<answer>3</answer>", "<answer>5</answer>"], 3)
    assert per_reward[0].tolist() == [1.0] * 6 and total.tolist() == [1.5] * 6
    _, swapped = rewards.compute_rewards([rewards.accuracy_reward], [1.0], completions,
                                       ["<answer>5</answer>", "<answer>3</answer>"], 3)
    assert swapped.tolist() == [0.0] * 6


def test_compute_rewards_gives_each_completion_its_prompts_columns():
    import rewards
    completions = ["<think></think><answer>B</answer>"] * 2 + ["<think></think><answer>2</answer>"] * 2
    seen = {}

    def spy(completions, solutions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    per_reward, _ = rewards.compute_rewards(
        [rewards.accuracy_reward, lambda completions, solutions: [1.0] * len(completions), spy], [1.0, 1.0, 1.0],
        completions, ["<answer>B</answer>", "<answer>2</answer>"], 2,
        problem_type=["multiple choice", "numerical"], options=[["A. x", "B. y"], []])
    assert per_reward.tolist() == [[1.0] * 4, [1.0] * 4, [0.0] * 4]
    assert seen == {"problem_type": ["multiple choice"] * 2 + ["numerical"] * 2, "options": [["A. x", "B. y"]] * 2 + [[]] * 2}
    # the same letter scored as a number: a multiple-choice row must reach the reward as one
    wrong_type, _ = rewards.compute_rewards([rewards.accuracy_reward], [1.0], completions[:2], ["<answer>B. y</answer>"], 2)
    assert wrong_type.tolist() == [[0.0, 0.0]]


def test_eta_formats():
    assert [train.eta(10.0, 1, n) for n in (0, 5, 30, 3312, 40000)] == ["0s", "50s", "5m00s", "9h12m", "111h06m"]


# ---------------------------------------------------------------------------------------------------------------
# the model passes, on the tiny model and two prompts of different lengths (left padding)

# every model-pass test runs on both families: Qwen2.5-VL adds window attention in the vision tower and time-based
# video positions (second_per_grid_ts), which each pass must get right
# (Qwen3-VL: timestamped frame groups, each its own grid in the positions, and DeepStack features in every pass)
@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def tiny_setup(request):
    tokenizer = tiny.build_tiny_tokenizer()
    model = tiny.build_tiny_model(tokenizer, seed=0, init_std=0.2, family=request.param)  # context-sensitive: see tiny.py
    model = use_packed_attention(model.eval())
    vision = model.config.vision_config
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2  # 1176; Qwen3-VL's 16-px patches: 1536
    torch.manual_seed(0)
    items = []
    for problem, grid, seconds in (("How many red objects are in the video?", [4, 4, 4], 1.0),
                                   ("How many?", [2, 4, 6], 0.5)):  # two video sizes and frame rates
        grid = torch.tensor([grid])
        # Qwen3-VL: frames sampled at 2 / seconds fps from a 10-fps video (frame indices 0, 5/seconds, ...)
        timestamps = (data.video_timestamps([round(i * 5 * seconds) for i in range(2 * grid[0, 0])], 10.0)
                      if request.param == "qwen3_vl" else None)
        input_ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, problem), grid, timestamps=timestamps)
        items.append({"input_ids": input_ids, "mm_token_type_ids": types, "video_grid_thw": grid,
                      "second_per_grid_ts": torch.tensor([seconds]),
                      "pixel_values_videos": torch.randn(int(grid.prod()), patch_dim),
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


@contextlib.contextmanager
def release_rule(model):
    """transformers' own forward and generate, their get_rope_index replaced by the release rule as test_positions
    writes it out (transformers 5.23 places text after a video elsewhere); Qwen3-VL keeps its own (the same there)."""
    if model.config.model_type == "qwen3_vl":
        yield
        return
    tps = getattr(model.config.vision_config, "tokens_per_second", 1)

    def get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                       attention_mask=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        seconds = second_per_grid_ts.tolist() if second_per_grid_ts is not None else None
        positions = torch.tensor(reference_positions(
            mm_token_type_ids.tolist(), mask.tolist(), video_grid_thw.tolist() if video_grid_thw is not None else [],
            seconds=seconds, tokens_per_second=tps, image_grids=image_grid_thw.tolist() if image_grid_thw is not None else ()),
            device=input_ids.device)
        return positions, (positions.amax(dim=(0, 2)) + 1 - mask.sum(1))[:, None]        # the decode's delta (B, 1)

    model.model.get_rope_index = get_rope_index
    try:
        yield
    finally:
        del model.model.get_rope_index


def slow_logps(model, batch, completion_ids, G):
    """The first trainer's way: the video (or image) repeated G times, full logits, positions left to transformers (by the release
    rule); transformers runs its vision tower on the images and on the videos apart."""
    input_ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), completion_ids], 1)
    attention_mask = torch.cat([batch["attention_mask"].repeat_interleave(G, 0), torch.ones_like(completion_ids)], 1)
    types = torch.cat([batch["mm_token_type_ids"].repeat_interleave(G, 0), torch.zeros_like(completion_ids)], 1)
    vision = {}  # one image or video per row: each repeated for the row's G completions
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid in batch:
            parts = torch.split(batch[pixels], batch[grid].prod(-1).tolist())
            vision.update({pixels: torch.cat([v for v in parts for _ in range(G)]), grid: batch[grid].repeat_interleave(G, 0)})
    with release_rule(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types, use_cache=False,
                    **vision, **family_inputs(model, batch, G))
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


def mixed_batch(tokenizer, model, batch):
    """The fixture's two video rows with an image row between them (grid 1 x 4 x 6, random pixels), float64."""
    vision = model.config.vision_config
    grid = torch.tensor([[1, 4, 6]])
    ids, types = data.encode_prompt(tokenizer, data.build_prompt_text(tokenizer, "What colour is it?", data_type="image"),
                                    grid, data_type="image")
    image = {"input_ids": ids, "mm_token_type_ids": types, "image_grid_thw": grid, "data_type": "image",
             "pixel_values": torch.randn(24, 3 * vision.temporal_patch_size * vision.patch_size ** 2, dtype=torch.float64),
             "problem": "What colour is it?", "solution": "<answer>red</answer>", "video": "i.png", "index": 2}
    first, second = data.uncollate(dict(batch, pixel_values_videos=batch["pixel_values_videos"].double()))
    mixed = data.collate([first, image, second], tokenizer.pad_token_id)
    assert mixed["data_type"] == ["video", "image", "video"]
    return mixed


def test_packed_pass_on_images_and_videos_equals_transformers_forward(tiny_setup):
    # a batch of video, image, video rows: the packed policy pass and the reference pass (one vision tower call for the
    # image and the videos together) against transformers' own forward (the tower run on images and videos apart)
    tokenizer, model, batch, eos, _ = tiny_setup
    model = copy.deepcopy(model).double()
    torch.manual_seed(3)
    mixed = mixed_batch(tokenizer, model, batch)
    G, C = 2, 5
    completion_ids = torch.randint(NORMAL_IDS, 400, (3 * G, C))
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    fast = completion_logps(model, mixed, completion_ids, num_generations=G, temperature=1.0)
    assert len(calls) == 1, "the vision tower must run once per pass, whatever the rows hold"
    reference = completion_logps_shared_prompt(model, mixed, completion_ids, num_generations=G, temperature=1.0)
    hook.remove()
    slow = slow_logps(model, mixed, completion_ids, G)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(reference, slow, rtol=1e-9, atol=1e-9)
    # the image's features matter: other pixels, other log-probs for its row only
    other = dict(mixed, pixel_values=mixed["pixel_values"] + 1)
    moved = (completion_logps(model, other, completion_ids, num_generations=G, temperature=1.0) - fast).abs().amax(1)
    assert moved[2:4].min() > 1e-6 and moved[[0, 1, 4, 5]].max() == 0


def test_rollout_on_a_mixed_batch_matches_transformers_generate(tiny_setup):
    # greedy, video / image / video rows: the prefill-once sampler against transformers' generate, row by row
    tokenizer, model, batch, eos, suppress = tiny_setup
    mixed = mixed_batch(tokenizer, model, batch)
    mixed = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in mixed.items()}
    ours = sample_completions(model, mixed, num_generations=1, max_new_tokens=6, temperature=1.0, eos_token_ids=eos,
                              suppress_token_ids=suppress, pad_token_id=tokenizer.pad_token_id, greedy=True)
    for b, item in enumerate(data.uncollate(mixed)):
        one = data.collate([item], tokenizer.pad_token_id)
        kinds = {k: one[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in one}
        with release_rule(model):
            out = model.generate(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                                 mm_token_type_ids=one["mm_token_type_ids"], max_new_tokens=6, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, suppress_tokens=suppress,
                                 **kinds, **(family_inputs(model, one) if item["data_type"] == "video" else {}))
        theirs = out[0, one["input_ids"].size(1):].tolist()
        assert ours[b, :len(theirs)].tolist() == theirs, f"row {b} ({item['data_type']})"


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


def test_deepstack_features_reach_every_pass(tiny_setup, monkeypatch):
    # Qwen3-VL adds vision features after its first decoder layers (DeepStack). The passes above equal the model's own
    # forward on pixel_values_videos; this shows those features matter, so a pass that dropped them would fail there
    tokenizer, model, batch, eos, suppress = tiny_setup
    if model.config.model_type != "qwen3_vl":
        pytest.skip("DeepStack is Qwen3-VL's")
    import model as model_lib
    completion_ids = torch.randint(NORMAL_IDS, 400, (2 * 2, 5))

    def passes():
        with torch.no_grad():
            policy = completion_logps(model, batch, completion_ids, num_generations=2, temperature=1.0)
        reference = completion_logps_shared_prompt(model, batch, completion_ids, num_generations=2, temperature=1.0)
        first = model_lib.prefill(model, batch, 1)[1]  # the rollout's first next-token logits (B, V)
        return policy, reference, first

    with_deepstack = passes()
    real = model_lib.vision_features

    def without_deepstack(model, batch):
        feats = real(model, batch)
        feats["video"].deepstack_features = [[torch.zeros_like(f) for f in layer] for layer in feats["video"].deepstack_features]
        return feats

    monkeypatch.setattr(model_lib, "vision_features", without_deepstack)
    for name, a, b in zip(("policy", "reference", "prefill"), with_deepstack, passes()):
        assert (a - b).abs().max() > 1e-3, f"{name} pass: zeroing the DeepStack features changed nothing"


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
        with release_rule(model):
            ref = model.generate(input_ids=batch["input_ids"][b:b + 1, row], attention_mask=batch["attention_mask"][b:b + 1, row],
                                 mm_token_type_ids=batch["mm_token_type_ids"][b:b + 1, row], pixel_values_videos=pixel_values,
                                 video_grid_thw=batch["video_grid_thw"][b:b + 1], max_new_tokens=C, do_sample=False,
                                 **family_inputs(model, batch, rows=slice(b, b + 1)),
                                 suppress_tokens=suppress, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        ref = ref[0, row.sum():].tolist()
        for g in range(G):  # completion b*G+g belongs to prompt b
            assert ours[b * G + g, :len(ref)].tolist() == ref


def test_apply_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    torch.manual_seed(0)
    logits, seen = torch.randn(3, 20), torch.randint(0, 20, (3, 9))  # repeated ids are penalised once, as HF
    torch.testing.assert_close(apply_repetition_penalty(logits.clone(), seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone()), rtol=0, atol=0)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_greedy_with_penalty_matches_generate_on_the_padded_batch(tiny_setup, tmp_path):
    # Video-R1's first trainer's eval: one left-padded batch, model.generate(..., do_sample=False) with the checkpoint's
    # generation_config in force (its repetition_penalty sees the padding too)
    tokenizer, model, batch, eos, suppress = tiny_setup
    model = copy.deepcopy(model)
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.save_pretrained(tmp_path)
    penalty = generation_repetition_penalty(str(tmp_path))
    assert penalty == 1.5 and generation_repetition_penalty(str(tmp_path / "none")) == 1.0
    C = 16
    kw = dict(num_generations=1, max_new_tokens=C, temperature=1.0, eos_token_ids=eos, suppress_token_ids=suppress,
              pad_token_id=tokenizer.pad_token_id, greedy=True)
    ours = sample_completions(model, batch, repetition_penalty=penalty, **kw)
    with release_rule(model):
        ref = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             mm_token_type_ids=batch["mm_token_type_ids"], pixel_values_videos=batch["pixel_values_videos"],
                             video_grid_thw=batch["video_grid_thw"], max_new_tokens=C, do_sample=False,
                             **family_inputs(model, batch), suppress_tokens=suppress, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
    ref = ref[:, batch["input_ids"].size(1):]
    assert ours.tolist() == ref[:, :ours.size(1)].tolist()
    plain = sample_completions(model, batch, **kw)  # penalty 1.0: the rollout's decoding, a different output here
    assert plain.tolist() != ours.tolist()


def test_rollout_with_per_prompt_counts_equals_separate_rollouts(tiny_setup):
    # T-GRPO's rollout: B prompts with G completions each, then the same B prompts on shuffled videos with G~ each,
    # in one call; greedy, so each row must equal the row of a separate rollout of its own prompt and video
    tokenizer, model, batch, eos, suppress = tiny_setup
    torch.manual_seed(1)
    batch = dict(batch, pixel_values_videos_shuffled=torch.randn_like(batch["pixel_values_videos"]))
    kw = dict(max_new_tokens=6, temperature=1.0, eos_token_ids=eos, suppress_token_ids=suppress,
              pad_token_id=tokenizer.pad_token_id, greedy=True)
    both = sample_completions(model, data.shuffled_copy(batch), num_generations=[3, 3, 2, 2], **kw)  # (10, C)
    normal = sample_completions(model, batch, num_generations=3, **kw)                                 # (6, C1)
    shuffled = sample_completions(model, dict(batch, pixel_values_videos=batch["pixel_values_videos_shuffled"]),
                                  num_generations=2, **kw)                                             # (4, C2)
    assert both.size(0) == 10
    for part, rows in ((both[:6], normal), (both[6:], shuffled)):
        C = rows.size(1)
        assert torch.equal(part[:, :C], rows) and part[:, C:].eq(tokenizer.pad_token_id).all()


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
    one_per_block = {"qwen2_vl": "fc1", "qwen2_5_vl": "up_proj", "qwen3_vl": "qkv"}[model.config.model_type]
    vision = lora_targets(model, f"q_proj,visual.{one_per_block}")
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
    train_path, _ = datatools.make_synthetic_dataset(str(root / "synthetic"), n_train=16, n_test=2)
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
import os, sys, deepspeed, torch, model, runtime
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
runtime.skip_cpu_allreduce_build()
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


INITIALIZE_SCRIPT = """
import sys, torch, deepspeed, runtime
runtime.init_distributed()
net = torch.nn.Linear(4, 4)
deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters()),
                     config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
print("compiler imported", "torch._inductor.compile_fx" in sys.modules)
"""


def test_deepspeed_initialize_on_cpu_compiles_nothing():
    # under ZeRO, deepspeed.initialize imports DeepSpeed's Muon optimizer, whose import torch.compiles its kernels:
    # ~1.4 CPU s a rank on CPU, where nothing else compiles (every training subprocess of the suite paid it)
    assert "compiler imported False" in run([sys.executable, "-c", INITIALIZE_SCRIPT]).stdout


# rank 0's groups all have reward variance, rank 1's none: under --dynamic_sampling rank 1 keeps asking for more
RANK_SPLIT_SCRIPT = """
import os, sys
sys.path.insert(0, os.getcwd())
import rewards, train
rewards.REWARD_FUNCS["rank_split"] = lambda completions, solutions: [
    float(os.environ["RANK"] == "0" and i % 2) for i in range(len(completions))]
train.main(sys.argv[1:])
"""


def test_deepspeed_two_ranks_zero3(tiny_data):
    root, model_dir, train_path = tiny_data
    out = root / "ds"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    with socket.socket() as sock:  # a free port: a fixed one can still be held by an earlier run's store
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    (root / "rank_split.py").write_text(RANK_SPLIT_SCRIPT)
    # dapo: all ranks' token count; dynamic sampling with ranks that drop different numbers of groups must not hang;
    # the entropy threshold is gathered from ranks holding different token counts
    run([deepspeed, "--num_gpus", "2", "--master_port", port, str(root / "rank_split.py"), "--tiny",
         "--model_name_or_path", model_dir, "--data", train_path, "--output_dir", str(out), "--max_steps", "2",
         "--num_workers", "0", "--num_generations", "4", "--prompts_per_device", "2", "--loss_type", "dapo",
         "--rewards", "rank_split,accuracy,format", "--reward_weights", "1,0,0", "--dynamic_sampling",
         "--dynamic_sampling_metric", "reward",
         "--max_resample", "2", "--top_entropy_quantile", "0.5"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # means over the 2 ranks: rank 0 drops 0 groups, rank 1 all 2 of each of its 3 rollouts
        assert r["dynamic/rollouts"] == 3 and r["dynamic/groups_dropped"] == 3 and r["dynamic/groups_filled"] == 1
        assert r["frac_zero_std_groups"] == 0.5 and 0 < r["entropy_threshold"] and math.isfinite(r["loss"])
    assert r["epoch"] == 1.5  # 2 steps x 3 batches of the 4 an epoch holds
    # DeepSpeed's CPU all-reduce op is not built, so no /dev/shm buffer (66 MB a rank) is left behind run after run
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    for key in ("loss", "reward", "reward_std", "rewards/accuracy", "rewards/format", "kl", "completion_length",
                "clip_ratio", "frac_zero_std_groups", "grad_norm", "lr", "step_time", "rollout_time", "tokens_per_sec",
                "video_r1_first/completion_length", "video_r1_first/reward", "video_r1_first/reward_std", "video_r1_first/rewards/accuracy_reward",
                "video_r1_first/rewards/format_reward", "video_r1_first/kl"):
        assert key in rows[0], key
    assert rows[0]["video_r1_first/completion_length"] == rows[0]["completion_length"] and math.isfinite(rows[0]["video_r1_first/kl"])
    config = json.load(open(out / "run_config.json"))
    assert config["world_size"] == 2
    from transformers import Qwen2VLForConditionalGeneration
    final = Qwen2VLForConditionalGeneration.from_pretrained(str(out / "final"))
    base = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    assert final.lm_head.weight.shape == base.lm_head.weight.shape  # the full weights, gathered from the shards
    for name in ("tokenizer.json", "preprocessor_config.json"):
        assert (out / "final" / name).exists()


# every completion equally right, while a second reward varies in every group: filtering on accuracy (the default) no
# group is ever informative, filtering on the total reward every group is
SAME_ACCURACY_SCRIPT = """
import sys, rewards, train
rewards.REWARD_FUNCS["same_accuracy"] = lambda completions, solutions: [1.0 for _ in completions]
rewards.REWARD_FUNCS["alternating"] = lambda completions, solutions: [float(i % 2) for i in range(len(completions))]
train.main(sys.argv[1:])
"""


def test_dynamic_sampling_filter_run_length_and_steps_without_signal(tiny_data):
    root, model_dir, train_path = tiny_data
    small = root / "synthetic" / "train8.jsonl"  # 8 rows: 4 batches of 2 prompts an epoch
    small.write_text("".join(open(train_path).readlines()[:8]))
    flags = ["--tiny", "--model_name_or_path", model_dir, "--data", str(small), "--num_workers", "0", "--save_steps", "0",
             "--num_generations", "2", "--prompts_per_device", "2", "--max_completion_length", "8", "--dynamic_sampling",
             "--rewards", "same_accuracy,alternating", "--log_samples_steps", "0"]
    # one epoch: step 1 takes 1 + 2 batches, step 2 the last one, and the run ends with its data (the step count 4 was
    # an upper bound); the schedule counts batches (linear to 0 over 4), whether or not an update was taken
    out = root / "dyn-epoch"
    proc = run([sys.executable, "-c", SAME_ACCURACY_SCRIPT, *flags, "--max_steps", "0", "--num_train_epochs", "1",
                "--max_resample", "2", "--output_dir", str(out)])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and [r["epoch"] for r in rows] == [0.75, 1.0]
    assert json.load(open(out / "run_config.json"))["finished_step"] == 2  # the step it ended at, not the bound 4
    assert [r["dynamic/rollouts"] for r in rows] == [3, 1] and [r["dynamic/groups_filled"] for r in rows] == [2, 2]
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * 1 / 4, 0.0])
    # no informative group on any rank: no update, logged as such, loss and kl not a number (never 0 over no token)
    assert [r["skipped_update"] for r in rows] == [1, 1] and all(math.isnan(r["loss"]) and math.isnan(r["kl"]) for r in rows)
    assert "update skipped, no informative group on any rank" in proc.stdout
    before, after = load_model(model_dir, bf16=False).state_dict(), load_model(str(out / "final"), bf16=False).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # weights unchanged
    # --dynamic_sampling_metric reward: every group informative; --max_steps: the run is max_steps long, its schedule in steps
    out = root / "dyn-steps"
    run([sys.executable, "-c", SAME_ACCURACY_SCRIPT, *flags, "--max_steps", "2", "--max_resample", "1",
         "--dynamic_sampling_metric", "reward", "--output_dir", str(out)])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and [r["lr"] for r in rows] == pytest.approx([1e-3, 0.0])
    assert [(r["skipped_update"], r["dynamic/rollouts"], r["dynamic/groups_dropped"]) for r in rows] == [(0, 1, 0)] * 2


def test_deepspeed_two_ranks_zero3_one_image_one_video(tiny_data):
    # ZeRO-3 on 2 ranks, one holding an image row and the other a video row in every step: the ranks must run the same
    # parameter gathers (the vision tower once per pass on each), T-GRPO's shuffled rollout on the video rank only, the
    # reference layer by layer (--no-gather_reference: the tower's gathers in that pass too)
    root, model_dir, train_path = tiny_data
    rows = json.loads(open(os.path.join(os.path.dirname(train_path), "train_260k.json")).read())
    mixed = root / "synthetic" / "one_image_one_video.json"
    mixed.write_text(json.dumps([next(r for r in rows if r["data_type"] == kind) for kind in ("image", "video")]))
    out = root / "ds_mixed"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run([deepspeed, "--num_gpus", "2", "--master_port", port, "train.py", "--tiny", "--model_name_or_path", model_dir,
         "--data", str(mixed), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0", "--num_workers", "0",
         "--num_generations", "2", "--prompts_per_device", "1", "--max_completion_length", "8", "--log_samples_steps", "1",
         "--temporal_contrast", "--no-gather_reference"], timeout=400)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in metrics] == [1, 2] and all(r["skipped_examples"] == 0 for r in metrics)
    assert all(r["temporal_rewards"] in (0.0, 0.5) for r in metrics)  # the image rank's prompt never gets the bonus
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    for step in (1, 2):  # one rank an image, the other the video, every step
        assert sorted((s["rank"], s["data_type"]) for s in samples if s["step"] == step)[::2] in (
            [(0, "image"), (1, "video")], [(0, "video"), (1, "image")])


# the run's accuracy reward is toy_accuracy (every completion correct) at weight 0: the total reward is the bonuses alone
TGRPO_SCRIPT = """
import sys, rewards, train
rewards.REWARD_FUNCS["toy_accuracy"] = lambda completions, solutions: [1.0 for _ in completions]
train.main(sys.argv[1:])
"""


def test_tgrpo_and_length_reward_run_on_the_runs_accuracy_reward(tiny_data):
    root, model_dir, train_path = tiny_data
    out = root / "tgrpo"
    run([sys.executable, "-c", TGRPO_SCRIPT, "--tiny", "--model_name_or_path", model_dir, "--data", train_path,
         "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0", "--num_workers", "0",
         "--num_generations", "4", "--prompts_per_device", "2", "--max_completion_length", "16",
         "--rewards", "toy_accuracy,format", "--reward_weights", "0,0", "--temporal_alpha", "0.3", "--length_bonus", "0.2",
         "--temporal_contrast", "--length_reward", "--length_window", "2,16", "--importance_sampling_level", "sequence",
         "--kl_clamp", "10", "--lr_scheduler", "cosine"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # p = p~ = 1: the T-GRPO bonus for all; every completion of >= 2 tokens gets the length bonus
        assert row["all_correct"] == 1.0 and row["all_wrong"] == 0.0 and row["temporal_rewards"] == 1.0, row
        assert row["length_rewards"] > 0 and row["reward"] == pytest.approx(0.3 + 0.2 * row["length_rewards"]), row
    config = json.load(open(out / "run_config.json"))
    assert config["temporal_contrast"] is True and config["accuracy_reward"] == "toy_accuracy"


def test_score_reads_the_runs_accuracy_reward_and_its_bonus_decides_the_sign():
    # a group of 4 all correct by my_accuracy (weight 0; rewards.accuracy_reward would score them 0): only the length
    # bonus (window 3..5 tokens) separates them, so it alone decides each advantage's sign
    import types
    import rewards
    my_accuracy = lambda completions, solutions: [1.0 for _ in completions]  # noqa: E731
    names = ["my_accuracy", "format"]
    assert rewards.reward_of_kind(names, "accuracy") == "my_accuracy" and rewards.reward_of_kind(names, "format") == "format"
    assert rewards.reward_of_kind(["format"], "accuracy") is None
    cfg = train.Config(num_generations=4, length_reward=True, length_bonus=0.2, length_window="3,5")
    run = types.SimpleNamespace(cfg=cfg, reward_funcs=[my_accuracy, rewards.format_reward], reward_weights=[0.0, 0.0],
                                accuracy_reward=my_accuracy, G_shuffled=2)
    batch = {"columns": {"problem_type": ["numerical"], "options": [None]}, "solution": ["<answer>3</answer>"],
             "video": ["v.mp4"], "data_type": ["video"]}
    lengths = torch.tensor([4.0, 9.0, 3.0, 1.0])
    scores = rewards.score(run, batch, ["a", "b", "c", "d"], None, lengths)
    reward, extra = scores.reward, rewards.score_metrics(scores, 4)
    advantages = train.group_advantages(reward, 4)
    assert reward.tolist() == pytest.approx([0.2, 0.0, 0.2, 0.0]) and extra["all_correct"] == 1.0
    assert (advantages > 0).tolist() == [True, False, True, False]


def test_a_new_shaper_in_the_table_is_applied_by_score_and_reads_the_chosen_accuracy(monkeypatch):
    # a group-level bonus is one function and one SHAPERS entry (with its flag): score() applies it after the
    # built-in ones, in table order, adds its bonus and logs <name>_rewards; --accuracy_reward picks what it reads
    import types
    import rewards
    monkeypatch.setitem(rewards.REWARD_FUNCS, "first_half", lambda completions, solutions: [1.0, 1.0, 0.0, 0.0])

    def toy(accuracy, lengths, toy_bonus):  # names what it reads: the run's accuracy, lengths, its own setting
        bonus = toy_bonus * accuracy * (lengths < 5)                                   # (B*G,)
        return bonus, (bonus > 0).float()

    monkeypatch.setitem(rewards.SHAPERS, "toy", rewards.Shaper(toy, "toy_on", "a test bonus"))
    names = ["accuracy", "first_half"]
    assert rewards.accuracy_reward_name(names) == "accuracy"  # today's rule: the first name containing "accuracy"
    assert rewards.accuracy_reward_name(["format"]) == "accuracy"
    chosen = rewards.accuracy_reward_name(names, "first_half")  # --accuracy_reward first_half
    cfg = types.SimpleNamespace(**vars(train.Config(num_generations=4, length_reward=True, length_window="3,5")),
                                toy_on=True, toy_bonus=0.5)
    run = types.SimpleNamespace(cfg=cfg, reward_funcs=[rewards.REWARD_FUNCS[n] for n in names], reward_weights=[0.0, 0.0],
                                accuracy_reward=rewards.REWARD_FUNCS[chosen], G_shuffled=2)
    batch = {"columns": {}, "solution": ["<answer>3</answer>"], "data_type": ["video"]}
    lengths = torch.tensor([4.0, 9.0, 3.0, 1.0])
    scores = rewards.score(run, batch, ["a", "b", "c", "d"], None, lengths)
    # first_half: rows 0, 1 correct (rewards.accuracy_reward would score all 0); length bonus (3..5 tokens): row 0
    assert scores.accuracy.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert scores.reward.tolist() == pytest.approx([0.2 + 0.5, 0.0, 0.0, 0.0])
    assert list(scores.bonuses) == ["length_rewards", "toy_rewards"]
    assert scores.bonuses["toy_rewards"].tolist() == [1.0, 0.0, 0.0, 0.0]
    cfg.toy_on = False  # its flag off: not applied
    assert rewards.score(run, batch, ["a", "b", "c", "d"], None, lengths).reward.tolist() == pytest.approx([0.2, 0, 0, 0])


def test_temporal_bonus_goes_to_video_rows_only_and_the_length_bonus_to_all():
    # T-GRPO as Video-R1 (`if self.temporal and video_inputs`): an image row has no shuffled rollout ("" texts) and no
    # temporal bonus; the length bonus is every row's
    import types
    import rewards
    always = lambda completions, solutions: [1.0 for _ in completions]  # noqa: E731
    cfg = train.Config(num_generations=2, temporal_contrast=True, length_reward=True, length_bonus=0.2, temporal_alpha=0.3,
                       length_window="3,5")
    run = types.SimpleNamespace(cfg=cfg, reward_funcs=[always], reward_weights=[0.0], accuracy_reward=always, G_shuffled=1)
    batch = {"columns": {"problem_type": ["numerical"] * 2, "options": [None] * 2}, "solution": ["<answer>3</answer>"] * 2,
             "video": ["v.mp4", "i.png"], "data_type": ["video", "image"]}
    scores = rewards.score(run, batch, ["a"] * 4, ["x", ""], torch.tensor([4.0, 9.0, 4.0, 9.0]))
    reward, extra = scores.reward, rewards.score_metrics(scores, 2)
    assert reward.tolist() == pytest.approx([0.3 + 0.2, 0.3, 0.2, 0.0]) and extra["temporal_rewards"] == 0.5


def test_weight_decay_groups_follow_the_hf_trainer():
    # the HF Trainer's rule (Video-R1's 260k recipe): no decay for biases and norm weights, decay for the rest
    from transformers import Trainer
    from model import weight_decay_groups
    tokenizer = tiny.build_tiny_tokenizer()
    model = tiny.build_tiny_model(tokenizer, family="qwen2_vl")
    model.model.visual.blocks[0].requires_grad_(False)  # frozen parameters are in no group
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    hf_decay = set(Trainer.get_decay_parameter_names(None, model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {names[id(p)] for p in decay["params"]} == hf_decay & trainable
    assert {names[id(p)] for p in no_decay["params"]} == trainable - hf_decay
    assert any(n.endswith(".bias") for n in trainable - hf_decay) and any("layernorm" in n for n in trainable - hf_decay)


@pytest.mark.parametrize("flags, message", [
    (["--importance_sampling_level", "seq"], "--importance_sampling_level 'seq'"),
    (["--length_window", "512,320"], "--length_window '512,320'"),
    (["--length_window", "320"], "--length_window '320'"),
    (["--lr_scheduler", "constant"], "--lr_scheduler must be linear or cosine"),
    (["--kl_clamp", "-1"], "--kl_clamp"),
    (["--top_entropy_quantile", "-0.1"], "--top_entropy_quantile must be in [0, 1]"),
    (["--top_entropy_quantile", "1.5"], "--top_entropy_quantile must be in [0, 1]"),
    (["--loss_type", "cispo", "--cispo_epsilon_max", "0"], "--cispo_epsilon_max above 0"),
    (["--loss_type", "sapo", "--sapo_temperature_neg", "0"], "--loss_type sapo: temperatures above 0"),
    (["--video_time", "seconds"], "--video_time 'seconds': one of ('true', 'video-r1')"),
    (["--image_min_pixels", "5000", "--image_max_pixels", "4000"], "image min <= max"),
    (["--video_max_pixels", "-1"], "0 (the default rule) or a bound"),
    (["--accuracy_reward", "acc"], "--accuracy_reward 'acc': choose one of"),
])
def test_new_flags_are_validated(flags, message, tmp_path):
    cfg = train.parse_config(["--tiny", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(train.ConfigError, match=re.escape(message)):
        train.validate_config(cfg)


def test_video_time_video_r1_needs_qwen2_5_vl(tmp_path):
    # only Qwen2.5-VL reads second_per_grid_ts: on another family the flag would change nothing, so it is an error
    for family in ("qwen2_vl", "qwen3_vl"):
        (tmp_path / family).mkdir()
        (tmp_path / family / "config.json").write_text(json.dumps({"model_type": family}))
        cfg = train.parse_config(["--tiny", "--output_dir", str(tmp_path / "out"), "--model_name_or_path",
                                  str(tmp_path / family), "--video_time", "video-r1"])
        with pytest.raises(train.ConfigError, match="only Qwen2.5-VL places video in time"):
            train.validate_config(cfg)
# the rewards a multiple-choice run must hand its columns to: one with the plain (completions, solutions)
# signature of a DVD-counting reward, one that names the columns it wants
MC_SCRIPT = """
import sys, rewards, train
rewards.REWARD_FUNCS["plain"] = lambda completions, solutions: [0.0 for _ in completions]
rewards.REWARD_FUNCS["mc_seen"] = lambda completions, solutions, problem_type, options: [
    float(t == "multiple choice" and len(o) == 4) for t, o in zip(problem_type, options)]
train.main(sys.argv[1:])
"""
SEED_METRICS = ("thinking_length", "empty_thinking_ratio", "answer_entropy", "answer_mode_share")


def test_tiny_multiple_choice_run_logs_video_r1_first_metrics_and_evals(tmp_path, capsys, warm_tiny_model):
    import eval as ev
    model_dir = warm_tiny_model(tmp_path / "model")  # warm-started: it writes thoughts and answers
    datatools.make_synthetic_dataset(str(tmp_path / "synthetic"), n_train=8, n_test=4)
    out, steps = tmp_path / "mc", 3
    proc = run([sys.executable, "-c", MC_SCRIPT, "--tiny", "--model_name_or_path", model_dir,
                "--data", str(tmp_path / "synthetic" / "train_mc.jsonl"), "--output_dir", str(out),
                "--max_steps", str(steps), "--save_steps", "0", "--num_workers", "0", "--num_generations", "4",
                "--prompts_per_device", "2", "--rewards", "accuracy,format,plain,mc_seen", "--reward_weights", "1,1,0,0"])
    # between the start line and the end line: exactly one line per step, ending in its time and an ETA
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if " examples, 1 ranks x 2 prompts x 4 completions" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("done: "))
    assert len(lines[start + 1:end]) == steps, lines[start + 1:end]
    for k, line in enumerate(lines[start + 1:end], 1):
        assert re.fullmatch(rf"step {k}/{steps} \| .* \| [0-9.]+s \| eta [0-9hms]+", line), line
    assert "FutureWarning" not in proc.stderr, proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert set(SEED_METRICS) <= set(r), r
        assert r["rewards/mc_seen"] == 1.0 and r["rewards/plain"] == 0.0  # columns reached the rewards that take them
        assert 0.0 <= r["empty_thinking_ratio"] <= 1.0 and r["thinking_length"] >= 0.0
        assert 0.0 <= r["answer_entropy"] <= math.log(4) + 1e-9 and 0.25 <= r["answer_mode_share"] <= 1.0
    assert max(r["thinking_length"] for r in rows) > 0  # the warm-started model thinks
    # eval on the multiple-choice test split: the per-type table
    summaries = ev.main(["--tiny", "--model", str(out / "final"), "--data", str(tmp_path / "synthetic" / "test_mc.jsonl"),
                         "--max_new_tokens", "16", "--num_workers", "0", "--output", str(tmp_path / "mc.json")])
    assert summaries[0]["n"] == 4 and set(summaries[0]["accuracy_by_type"]) == {"multiple choice"}
    assert "multiple choice (%)" in capsys.readouterr().out


def test_tiny_run_on_all_five_video_r1_types_with_its_reward_and_prompt(tiny_data):
    """Video-R1's later recipe on a 260k-layout split of all five problem types: its accuracy rule, its words."""
    import rewards
    root, model_dir, train_path = tiny_data
    out, split = root / "video-r1", os.path.join(os.path.dirname(train_path), "train_260k.json")
    assert {r["problem_type"] for r in json.load(open(split))} == set(rewards.PROBLEM_TYPES)
    # the later recipe's flags (docs/video-r1-recipe.md's tiny demo): T-GRPO and the length reward, on video and image rows
    run([sys.executable, "train.py", "--tiny", "--model_name_or_path", model_dir, "--data", split,
         "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0", "--num_workers", "0", "--num_generations", "2",
         "--prompts_per_device", "5", "--max_completion_length", "8", "--log_samples_steps", "1",
         "--rewards", "video_r1_accuracy,video_r1_format", "--prompt_template", "video-r1", "--temporal_contrast", "--length_reward"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["rewards/video_r1_accuracy"] <= 1 for r in rows)
    assert all(r["skipped_examples"] == 0 and "temporal_rewards" in r and "length_rewards" in r for r in rows)
    assert json.load(open(out / "run_config.json"))["prompt_template"] == "video-r1"
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert {s["data_type"] for s in samples} == {"video", "image"}
    assert all(s["video"].endswith(".png") == (s["data_type"] == "image") for s in samples)
    for s in samples:  # each completion scored by its own row's type
        row = next(r for r in json.load(open(split)) if r["problem"] == s["question"] and r["solution"] == s["solution"])
        assert s["rewards"]["video_r1_accuracy"] == pytest.approx(
            rewards.video_r1_accuracy([s["completion"]], [s["solution"]], problem_type=[row["problem_type"]])[0])
    with pytest.raises(train.ConfigError, match="--prompt_template 'r1'"):
        train.validate_config(train.parse_config(["--tiny", "--output_dir", str(out), "--prompt_template", "r1"]))
