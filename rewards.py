"""Rule-based rewards for GRPO on video QA (Video-R1 style).

Every reward function has the signature `fn(completions, solutions) -> list[float]`
and returns one float per completion. Add a reward by writing one function and
adding it to REWARD_FUNCS; the trainer looks names up there (`--rewards accuracy,format`).

Rules
-----
format   1.0 iff the stripped completion is exactly
             <think> T </think> (optional whitespace) <answer> A </answer>
         where T and A contain none of the four tags, T may be empty and A is not
         blank. Tags are case-sensitive. Text before/after, a second answer block,
         nested or repeated tags all score 0.0.

accuracy 1.0 iff the completion's answer equals the truth.
         answer = text between the *last* <answer> and the first </answer> after
                  it, stripped. No such pair, or a blank answer, scores 0.0, so a
                  bare "3" or a "3" that only appears inside <think> earns nothing.
         truth  = the solution's answer, or the stripped solution if it has no tags.
         If both sides look like numbers ([+-]digits[.digits]) they are compared
         by exact decimal value (3 == 3.0 == 3. == +3 == 03, -0 == 0); otherwise
         case-insensitively with runs of whitespace folded to one space.

seed_accuracy, seed_format: the seed's two rules, exactly (see their docstrings); they let through what the rules
         above refuse (a bare "3", an empty answer, a second answer block) and refuse "3.0" for "3".

Anything that is not a string (e.g. None) scores 0.0 and never raises.
All functions are linear in the input length: only str.find/rfind/split and one
anchored regex without nested quantifiers, so a 200k-char completion or thousands
of repeated tags cost milliseconds.
"""

import re
from decimal import Decimal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Optional sign, digits, optional "." and digits. ASCII only, no exponent.
# No nested quantifiers, so matching is linear.
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?")


def _has_tag(text):
    return any(tag in text for tag in TAGS)


def extract_answer(text):
    """Stripped text between the last <answer> and the first </answer> after it, else None."""
    if not isinstance(text, str):
        return None
    start = text.rfind(ANSWER_OPEN)
    if start == -1:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    if end == -1:
        return None
    return text[start:end].strip()


def thinking_text(text):
    """Text inside the first well-formed <think>...</think>, else None (for a thinking-length metric)."""
    if not isinstance(text, str):
        return None
    end = text.find(THINK_CLOSE)
    if end == -1:
        return None
    # Nearest opener before the first closer, so the result never contains a think tag.
    start = text.rfind(THINK_OPEN, 0, end)
    if start == -1:
        return None
    return text[start + len(THINK_OPEN):end]


def _format_ok(text):
    if not isinstance(text, str):
        return False
    s = text.strip()
    if not s.startswith(THINK_OPEN):
        return False
    think_end = s.find(THINK_CLOSE, len(THINK_OPEN))
    if think_end == -1:
        return False
    thought = s[len(THINK_OPEN):think_end]
    rest = s[think_end + len(THINK_CLOSE):].lstrip()
    # The rest must be exactly one <answer>...</answer> block; the length check
    # stops "<answer>" from being read as both its own opener and closer.
    if not (rest.startswith(ANSWER_OPEN) and rest.endswith(ANSWER_CLOSE)):
        return False
    if len(rest) < len(ANSWER_OPEN) + len(ANSWER_CLOSE):
        return False
    answer = rest[len(ANSWER_OPEN):len(rest) - len(ANSWER_CLOSE)]
    if _has_tag(thought) or _has_tag(answer):
        return False  # nested/repeated tags, second answer block, etc.
    return answer.strip() != ""


def format_reward(completions, solutions=None):
    """1.0 per completion that is exactly <think>..</think><answer>..</answer>."""
    return [1.0 if _format_ok(c) else 0.0 for c in completions]


def _normalize_text(s):
    return " ".join(s.split()).casefold()


def _answers_match(pred, truth):
    if _NUMBER.fullmatch(pred) and _NUMBER.fullmatch(truth):
        # Decimal from the string is exact and has no int-digit limit, unlike float/int.
        return Decimal(pred) == Decimal(truth)
    return _normalize_text(pred) == _normalize_text(truth)


def _truth(solution):
    if not isinstance(solution, str):
        return None
    tagged = extract_answer(solution)
    return tagged if tagged is not None else solution.strip()


def _accuracy_one(completion, solution):
    pred = extract_answer(completion)
    truth = _truth(solution)
    if not pred or not truth:
        return 0.0  # blank answers never match, even a blank truth
    return 1.0 if _answers_match(pred, truth) else 0.0


def accuracy_reward(completions, solutions):
    """1.0 per completion whose <answer> equals the solution (numeric or normalized text)."""
    completions, solutions = list(completions), list(solutions)
    if len(completions) != len(solutions):
        raise ValueError(
            f"accuracy_reward: got {len(completions)} completions but {len(solutions)} solutions"
        )
    return [_accuracy_one(c, s) for c, s in zip(completions, solutions)]


# ----------------------------------------------------------------------------- the seed's rules, exactly

def seed_accuracy(completions, solutions, **kwargs):
    """The seed's accuracy_reward (src/r1-v/src/open_r1/grpo.py), rule for rule: math_verify's parse of the whole
    completion verified against parse(solution); failing that, the stripped text of the FIRST <answer>(.*?)</answer>
    (no DOTALL: one line) equals the solution's the same way, as strings; a side with no tag is compared whole.
    So a bare "3" scores 1.0 and "<answer>3.0</answer>" against "3" scores 0.0 unless math_verify sees them equal.
    parse("<answer>3</answer>") is [] (math-verify 0.9.0), so for tagged solutions the string rule decides."""
    from math_verify import parse, verify
    out = []
    for content, sol in zip(completions, solutions):
        reward = 0.0
        try:  # the seed swallows every error of either rule; so do we, to score as it did
            if float(verify(parse(content), parse(sol))) > 0:
                reward = 1.0
        except Exception:
            pass
        if reward == 0.0:
            try:
                sol_match = re.search(r"<answer>(.*?)</answer>", sol)
                truth = sol_match.group(1).strip() if sol_match else sol.strip()
                content_match = re.search(r"<answer>(.*?)</answer>", content)
                if (content_match.group(1).strip() if content_match else content.strip()) == truth:
                    reward = 1.0
            except Exception:
                pass
        out.append(reward)
    return out


def seed_format(completions, solutions=None, **kwargs):
    """The seed's format_reward: re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL), no strip:
    a leading space or a trailing newline fails; an empty answer or a second think/answer pair passes."""
    return [1.0 if isinstance(c, str) and re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", c, re.DOTALL)
            else 0.0 for c in completions]


def seed_metrics(completions, solutions, group_size):
    """The seed's reward metrics, under its names with a seed/ prefix, scored by its two rules whatever --rewards trains
    on, so a run's curves lie over a seed run's: seed/rewards/accuracy_reward, seed/rewards/format_reward, seed/reward
    (their sum, the seed's weights) and seed/reward_std (mean over groups of the G rewards' unbiased std).
    solutions: one per prompt; completion i belongs to prompt i // group_size."""
    import statistics
    acc = seed_accuracy(completions, [s for s in solutions for _ in range(group_size)])
    fmt = seed_format(completions)
    total = [a + f for a, f in zip(acc, fmt)]
    stds = [statistics.stdev(total[i:i + group_size]) for i in range(0, len(total), group_size)]
    return {"seed/reward": sum(total) / len(total), "seed/reward_std": sum(stds) / len(stds),
            "seed/rewards/accuracy_reward": sum(acc) / len(acc), "seed/rewards/format_reward": sum(fmt) / len(fmt)}
# ----------------------------------------------------------------------------------------------------------------
# bonuses of the seed's newer trainer (T-GRPO, length control) and the learning-signal metrics: pure tensor functions
# on accuracies (B*G,) ordered group by group; "correct" is accuracy > 0.1, as the seed tests it.

def temporal_bonus(accuracy, shuffled_accuracy, has_video, group_size, shuffled_group_size, *, alpha=0.3, mu=0.8):
    """T-GRPO, decided per prompt: p = mean accuracy of its G normal completions, p~ = of its G~ completions on the
    shuffled video. If p >= mu * p~ (and the prompt has a video), each normal completion with accuracy > 0.1 gets
    +alpha. accuracy (B*G,), shuffled_accuracy (B*G~,), has_video (B,) -> (bonus (B*G,), given (B,) bool)"""
    acc = accuracy.view(-1, group_size)                                        # (B, G)
    shuffled = shuffled_accuracy.view(-1, shuffled_group_size)                 # (B, G~)
    assert acc.size(0) == shuffled.size(0) == has_video.numel(), "one group of each per prompt"
    given = (acc.mean(1) >= mu * shuffled.mean(1)) & has_video.bool()          # (B,)
    bonus = alpha * ((acc > 0.1) & given[:, None]).to(acc.dtype)               # (B, G)
    return bonus.view(-1), given


def length_bonus(accuracy, lengths, group_size, *, window=(320, 512), bonus=0.2):
    """The seed's length control: in a group with more than one correct completion, each correct one whose length
    (tokens, EOS included) lies in [window[0], window[1]] gets +bonus. accuracy, lengths (B*G,) -> (B*G,)"""
    correct = (accuracy > 0.1).view(-1, group_size)                            # (B, G)
    in_window = ((lengths >= window[0]) & (lengths <= window[1])).view(-1, group_size)  # (B, G)
    several = correct.sum(1, keepdim=True) > 1                                 # (B, 1)
    return bonus * (correct & in_window & several).to(accuracy.dtype).view(-1)  # (B*G,)


def signal_groups(accuracy, group_size):
    """(all_correct, all_wrong): the fraction of groups whose accuracies are all 1 / all 0. Such a group has equal
    accuracies, so it teaches nothing about correctness (zero advantage unless another reward varies). (B*G,) -> floats"""
    acc = accuracy.view(-1, group_size)                                        # (B, G)
    return (acc >= 1).all(1).float().mean().item(), (acc <= 0).all(1).float().mean().item()


REWARD_FUNCS = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "seed_accuracy": seed_accuracy,  # --rewards seed_accuracy,seed_format: the seed's reward signal
    "seed_format": seed_format,
}
