"""Rule-based rewards for GRPO on video QA (Video-R1 style).

Every reward function has the signature `fn(completions, solutions, **kwargs) -> list[float]`
and returns one float per completion. Add a reward by writing one function and
adding it to REWARD_FUNCS; the trainer looks names up there (`--rewards accuracy,format`).
The trainer passes the rows' columns, one value per completion, as keyword arguments: every column
of the data file (problem_type=[...], options=[...], data_source=[...], ...). call_reward passes a function only
the ones its signature names (all of them to a **kwargs), so a plain `fn(completions, solutions)` keeps working.
A group-level bonus (T-GRPO's, the length bonus) is a SHAPERS entry, turned on by its flag.

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
         By the row's problem_type (PROBLEM_TYPES; "numerical" when not given):
         numerical, free-form: if both sides look like numbers ([+-]digits[.digits])
             they are compared by exact decimal value (3 == 3.0 == 3. == +3 == 03,
             -0 == 0); otherwise case-insensitively with runs of whitespace folded
             to one space (free-form: a normalised exact match, no ROUGE).
         multiple choice: the option letters must be equal (option_letter): "B",
             "B.", "(B)", "B)", "B: text", "B. text" and (options known) B's whole
             text alone all give B. The text after the letter must be that option's
             text (when the options are known; compared first, so "B. A blue sphere"
             and "C. Vitamin C" are read whole) and otherwise must not name another
             capital letter; two letters, a lowercase letter or a letter outside the
             options are wrong. A truth is read the same way ("B. A blue sphere": B).
         OCR: 1 - word error rate (word_error_rate: Levenshtein distance over
             whitespace-separated words / the truth's word count), case-folded,
             clipped to [0, 1]: partial credit.
         regression: mean relative accuracy, as Video-R1's eval script scores it:
             the share of its ten thresholds t = 0.50, 0.55, ..., 0.95 with
             |pred - truth| / |truth| < 1 - t (mean_relative_accuracy; VSI-Bench's own
             scorer in lmms-eval takes eleven, with <=); a non-number answer scores 0.0.

video_r1_accuracy: Video-R1's later trainer's rule exactly (src/r1-v/src/open_r1/grpo.py; see its docstring);
         its format rule is video_r1_format's, so its recipe is --rewards video_r1_accuracy,video_r1_format.
video_r1_eval_reward: its eval script's reward_fn (src/eval_bench.py), for eval.py --protocol video-r1.

video_r1_first_accuracy, video_r1_format: Video-R1's first trainer's two rules, exactly (see their docstrings); they let through what the rules
         above refuse (a bare "3", an empty answer, a second answer block) and refuse "3.0" for "3".

Anything that is not a string (e.g. None) scores 0.0 and never raises.
All functions are linear in the input length: only str.find/rfind/split and one
anchored regex without nested quantifiers, so a 200k-char completion or thousands
of repeated tags cost milliseconds.
"""

import collections
import contextlib
import inspect
import math
import re
from collections import Counter
from decimal import Decimal

import torch

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Optional sign, digits, optional "." and digits. ASCII only, no exponent.
# No nested quantifiers, so matching is linear.
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?")
# Video-R1-260k's five problem types (its grpo.py's TYPE_TEMPLATE keys)
PROBLEM_TYPES = ("numerical", "multiple choice", "free-form", "OCR", "regression")
# An option letter: "B", "(B)", then optionally ". text", ") text", ": text". Linear: no nested quantifiers.
_OPTION = re.compile(r"\(?([A-Z])\)?(?:[.:)]\s*(.*))?", re.DOTALL)
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z])")


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


def format_reward(completions, solutions=None, **kwargs):
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


def parse_options(options):
    """{letter: normalised text} of a multiple-choice row's options ("A. red cube" -> A: "red cube"); an option
    without a letter of its own gets its place's letter (A, B, ...)."""
    parsed = {}
    for i, option in enumerate(options or []):
        m = _OPTION.fullmatch(str(option).strip())
        if m and m.group(2) is not None:
            parsed[m.group(1)] = _normalize_option_text(m.group(2))
        else:
            parsed[chr(ord("A") + i)] = _normalize_option_text(str(option))
    return parsed


def _normalize_option_text(text):
    return _normalize_text(text).rstrip(".")


def option_letter(answer, options=None):
    """The one option letter an answer names, else None. "B", "B.", "(B)", "B. A blue sphere", "(B) A blue sphere"
    -> "B"; with the options known, an option's whole text alone ("A blue sphere") names its letter too.
    The text after a letter is compared with that option's own text first, so an option that holds a capital
    letter ("A red cube", "Vitamin C", "I don't know") is read whole. None for: no letter, a lowercase letter, two
    letters ("A and B", "B. C"), a letter that is not one of the options, or text after the letter that is not that
    option's text."""
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    parsed = parse_options(options)
    m = _OPTION.fullmatch(text)
    if m is not None:
        letter, rest = m.group(1), (m.group(2) or "").strip()
        known = not parsed or letter in parsed
        if known and (not rest or (parsed and _normalize_option_text(rest) == parsed[letter])):
            return letter  # "B", or "B." + B's own text, whatever letters that text holds
        if known and not parsed and not _LONE_CAPITAL.search(rest):
            return letter  # options unknown: "B. anything" unless it names a second letter ("B. C")
    # no letter of its own: an option's whole text ("A blue sphere", "I don't know") names that option
    named = [k for k, v in parsed.items() if v == _normalize_option_text(text)]
    return named[0] if len(named) == 1 else None


def word_error_rate(reference, hypothesis):
    """Word-level Levenshtein distance (substitutions, insertions, deletions) / the reference's word count (at
    least 1), words split on whitespace. Can exceed 1 (a long wrong hypothesis). Cross-checked against jiwer."""
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))  # distances from the empty reference prefix
    for i, r in enumerate(ref, 1):
        prev_diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (r != h))
    return row[-1] / max(1, len(ref))


def mean_relative_accuracy(pred, truth, start=0.5, end=0.95, step=0.05):
    """VSI-Bench's MRA: the share of thresholds t in start, start + step, ..., end (ten by default) with
    |pred - truth| / |truth| < 1 - t. An exact answer scores 1.0, one off by half the truth or more 0.0."""
    n = round((end - start) / step) + 1
    rel = abs(pred - truth) / abs(truth) if truth != 0 else (0.0 if pred == 0 else math.inf)
    return sum(rel < round(1 - (start + k * step), 12) for k in range(n)) / n  # round: 1 - 0.95 is 0.05, not 0.0500...04


def _accuracy_one(completion, solution, problem_type="numerical", options=None):
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"accuracy_reward: unknown problem_type {problem_type!r}; known: {PROBLEM_TYPES}")
    pred = extract_answer(completion)
    truth = _truth(solution)
    if not pred or not truth:
        return 0.0  # blank answers never match, even a blank truth
    if problem_type == "multiple choice":
        letter = option_letter(pred, options)
        return 1.0 if letter is not None and letter == option_letter(truth, options) else 0.0
    if problem_type == "OCR":
        return max(0.0, min(1.0, 1.0 - word_error_rate(_normalize_text(truth), _normalize_text(pred))))
    if problem_type == "regression":
        if not (_NUMBER.fullmatch(pred) and _NUMBER.fullmatch(truth)):
            return 0.0
        return mean_relative_accuracy(float(pred), float(truth))
    return 1.0 if _answers_match(pred, truth) else 0.0


def accuracy_reward(completions, solutions, problem_type=None, options=None, **kwargs):
    """1.0 per completion whose <answer> equals the solution, by its problem_type (default: numerical)."""
    completions, solutions = list(completions), list(solutions)
    if len(completions) != len(solutions):
        raise ValueError(
            f"accuracy_reward: got {len(completions)} completions but {len(solutions)} solutions"
        )
    types = list(problem_type) if problem_type is not None else ["numerical"] * len(completions)
    options = list(options) if options is not None else [None] * len(completions)
    if not len(types) == len(options) == len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions, {len(types)} problem types, "
                         f"{len(options)} options")
    return [_accuracy_one(c, s, t, o) for c, s, t, o in zip(completions, solutions, types, options)]


def call_reward(fn, completions, solutions, **columns):
    """fn(completions, solutions, ...) with only the columns its signature takes (all of them for **kwargs)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        columns = {k: v for k, v in columns.items() if k in params}
    return fn(completions, solutions, **columns)


# ----------------------------------------------------------------------------- metrics of Video-R1's first trainer's findings

def answer_key(completion, problem_type="numerical", options=None):
    """What counts as "the same answer" within a group, parsed as accuracy does: the option letter (multiple
    choice), the decimal value of a number, else the normalised text; "none" when there is no usable answer."""
    pred = extract_answer(completion)
    if not pred:
        return "none"
    if problem_type == "multiple choice":
        return option_letter(pred, options) or "none"
    if _NUMBER.fullmatch(pred):
        return str(Decimal(pred).normalize() + 0)  # 3 == 3.0 == 03; "+ 0" turns -0 into 0
    return _normalize_text(pred)


def answer_diversity(keys, group_size):
    """keys (B*G,) from answer_key, group by group -> (mean entropy in nats of each group's answers, mean share of
    each group's most common answer). All G answers equal: (0.0, 1.0); all different: (log G, 1/G)."""
    assert len(keys) % group_size == 0, f"{len(keys)} answers do not split into groups of {group_size}"
    entropies, modes = [], []
    for g in range(0, len(keys), group_size):
        counts = Counter(keys[g:g + group_size]).values()
        entropies.append(-sum(c / group_size * math.log(c / group_size) for c in counts))
        modes.append(max(counts) / group_size)
    return sum(entropies) / len(entropies), sum(modes) / len(modes)


def thinking_stats(completions, count_tokens):
    """(mean tokens inside <think>...</think>, 0 without one; share of completions whose thought is present but
    blank, the 2B collapse `<think>\n</think>`). count_tokens(text) -> int, e.g. the tokenizer's length."""
    lengths, empty = [], 0
    for c in completions:
        thought = thinking_text(c)
        lengths.append(0 if thought is None else count_tokens(thought))
        empty += thought is not None and not thought.strip()
    return sum(lengths) / max(len(lengths), 1), empty / max(len(lengths), 1)


def findings_metrics(completions, group_size, count_tokens, problem_type=None, options=None, **other_columns):
    """The per-step measures of Video-R1's first trainer's findings, for B*G completions ordered prompt by prompt: thinking_length,
    empty_thinking_ratio (thinking_stats), answer_entropy and answer_mode_share (answer_diversity of answer_key).
    problem_type and options are per prompt (B,), as in a batch's columns (the others are not read); count_tokens(text) -> int."""
    n_prompts = len(completions) // group_size
    problem_type = problem_type if problem_type is not None else ["numerical"] * n_prompts
    options = options if options is not None else [None] * n_prompts
    thinking_length, empty_ratio = thinking_stats(completions, count_tokens)
    keys = [answer_key(c, problem_type[i // group_size], options[i // group_size]) for i, c in enumerate(completions)]
    entropy, mode_share = answer_diversity(keys, group_size)
    return {"thinking_length": thinking_length, "empty_thinking_ratio": empty_ratio, "answer_entropy": entropy,
            "answer_mode_share": mode_share}


# ----------------------------------------------------------------------------- Video-R1's first trainer's rules, exactly

def video_r1_first_accuracy(completions, solutions, **kwargs):
    """Video-R1's first trainer's accuracy_reward (src/r1-v/src/open_r1/grpo.py), rule for rule: math_verify's parse of the whole
    completion verified against parse(solution); failing that, the stripped text of the FIRST <answer>(.*?)</answer>
    (no DOTALL: one line) equals the solution's the same way, as strings; a side with no tag is compared whole.
    So a bare "3" scores 1.0 and "<answer>3.0</answer>" against "3" scores 0.0 unless math_verify sees them equal.
    parse("<answer>3</answer>") is [] (math-verify 0.9.0), so for tagged solutions the string rule decides."""
    from math_verify import parse, verify
    out = []
    for content, sol in zip(completions, solutions):
        reward = 0.0
        with contextlib.suppress(Exception):  # Video-R1's first trainer swallows every error of either rule; so do we, to score as it did
            if float(verify(parse(content), parse(sol))) > 0:
                reward = 1.0
        if reward == 0.0:
            with contextlib.suppress(Exception):
                sol_match = re.search(r"<answer>(.*?)</answer>", sol)
                truth = sol_match.group(1).strip() if sol_match else sol.strip()
                content_match = re.search(r"<answer>(.*?)</answer>", content)
                if (content_match.group(1).strip() if content_match else content.strip()) == truth:
                    reward = 1.0
        out.append(reward)
    return out


def video_r1_format(completions, solutions=None, **kwargs):
    """Video-R1's first trainer's format_reward: re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL), no strip:
    a leading space or a trailing newline fails; an empty answer or a second think/answer pair passes."""
    return [1.0 if isinstance(c, str) and re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", c, re.DOTALL)
            else 0.0 for c in completions]


def video_r1_first_metrics(completions, solutions, group_size):
    """Video-R1's first trainer's reward metrics, under its names with a video_r1_first/ prefix, scored by its two rules whatever --rewards trains
    on, so a run's curves lie over one of Video-R1's first trainer's: video_r1_first/rewards/accuracy_reward, video_r1_first/rewards/format_reward, video_r1_first/reward
    (their sum, Video-R1's first trainer's weights) and video_r1_first/reward_std (mean over groups of the G rewards' unbiased std).
    solutions: one per prompt; completion i belongs to prompt i // group_size."""
    import statistics
    acc = video_r1_first_accuracy(completions, [s for s in solutions for _ in range(group_size)])
    fmt = video_r1_format(completions)
    total = [a + f for a, f in zip(acc, fmt)]
    stds = [statistics.stdev(total[i:i + group_size]) for i in range(0, len(total), group_size)]
    return {"video_r1_first/reward": sum(total) / len(total), "video_r1_first/reward_std": sum(stds) / len(stds),
            "video_r1_first/rewards/accuracy_reward": sum(acc) / len(acc), "video_r1_first/rewards/format_reward": sum(fmt) / len(fmt)}
# ----------------------------------------------------------------------------------------------------------------
# bonuses of Video-R1's later trainer (T-GRPO, length control) and the learning-signal metrics: pure tensor functions
# on accuracies (B*G,) ordered group by group; "correct" is accuracy > 0.1, as Video-R1's first trainer tests it.

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
    """Video-R1's first trainer's length control: in a group with more than one correct completion, each correct one whose length
    (tokens, EOS included) lies in [window[0], window[1]] gets +bonus. accuracy, lengths (B*G,) -> (B*G,)"""
    correct = (accuracy > 0.1).view(-1, group_size)                            # (B, G)
    in_window = ((lengths >= window[0]) & (lengths <= window[1])).view(-1, group_size)  # (B, G)
    several = correct.sum(1, keepdim=True) > 1                                 # (B, 1)
    return bonus * (correct & in_window & several).to(accuracy.dtype).view(-1)  # (B*G,)


length_rule = length_bonus  # for length_shaper, whose setting length_bonus (the flag) hides the function's name


def signal_groups(accuracy, group_size):
    """(all_correct, all_wrong): the fraction of groups whose accuracies are all 1 / all 0. Such a group has equal
    accuracies, so it teaches nothing about correctness (zero advantage unless another reward varies). (B*G,) -> floats"""
    acc = accuracy.view(-1, group_size)                                        # (B, G)
    return (acc >= 1).all(1).float().mean().item(), (acc <= 0).all(1).float().mean().item()


def compute_rewards(reward_funcs, reward_weights, completions, solutions, group_size, **columns):
    """Score B*G completions, ordered prompt by prompt, against their own prompt's solution (B solutions).
    columns: the rows' columns, one per-prompt list each (problem_type=[...], options=[...], data_source=[...]), given
    per completion to the rewards that name them. Returns (per-reward scores (R, B*G), weighted total (B*G,))."""
    assert len(completions) == len(solutions) * group_size, f"{len(completions)} completions for {len(solutions)} prompts x {group_size}"
    per_prompt = [s for s in solutions for _ in range(group_size)]  # completion i belongs to prompt i // G
    columns = {k: [v for v in values for _ in range(group_size)] for k, values in columns.items()
               if k not in ("completions", "solutions")}  # those two are the rewards' own arguments
    per_reward = torch.tensor([call_reward(fn, completions, per_prompt, **columns) for fn in reward_funcs],
                              dtype=torch.float32)  # (R, B*G)
    return per_reward, (torch.tensor(reward_weights, dtype=torch.float32)[:, None] * per_reward).sum(0)


# Group-level bonuses, applied by score() in table order to the runs whose `flag` (a train.Config field) is on. A shaper
# names what it reads, by keyword: accuracy (B*G,) (the run's accuracy reward), lengths (B*G,) (tokens, EOS included),
# shuffled_accuracy (B*G~,) (T-GRPO's rollout, None without one), has_video (B,), group_size, shuffled_group_size, and
# any Config field (its settings). It returns (bonus (B*G,), rows (B*G,)): the bonus added to the total reward, and
# which rows it counts as given, logged as `<name>_rewards` (the share of rows). A new bonus: a function, an entry.
Shaper = collections.namedtuple("Shaper", "fn flag help")


def temporal_shaper(accuracy, shuffled_accuracy, has_video, group_size, shuffled_group_size, temporal_alpha, temporal_mu):
    bonus, given = temporal_bonus(accuracy, shuffled_accuracy, has_video, group_size, shuffled_group_size,
                                  alpha=temporal_alpha, mu=temporal_mu)               # (B*G,), (B,)
    return bonus, given.float().repeat_interleave(group_size)                         # (B*G,), (B*G,): per prompt


def length_shaper(accuracy, lengths, group_size, length_window, length_bonus):
    window = tuple(int(n) for n in length_window.split(","))
    bonus = length_rule(accuracy, lengths, group_size, window=window, bonus=length_bonus)  # (B*G,)
    return bonus, (bonus > 0).float()                                                 # (B*G,), (B*G,)


SHAPERS = {
    "temporal": Shaper(temporal_shaper, "temporal_contrast", "T-GRPO: +temporal_alpha to correct completions of a video "
                       "prompt whose accuracy p >= temporal_mu * the shuffled video's (temporal_bonus)"),
    "length": Shaper(length_shaper, "length_reward", "+length_bonus to correct completions with a length in "
                     "length_window, in groups with more than one correct (length_bonus)"),
}


def apply_shapers(shapers, reward, inputs, settings):
    """reward (B*G,) plus each shaper's bonus, in order. inputs: {name: value} a shaper may read; settings: the Config.
    Returns (reward (B*G,), {"<name>_rewards": rows (B*G,)})."""
    given = {}
    for name, shaper in shapers.items():
        names = inspect.signature(shaper.fn).parameters
        bonus, given[f"{name}_rewards"] = shaper.fn(**{k: inputs[k] if k in inputs else getattr(settings, k) for k in names})
        reward = reward + bonus                                                       # (B*G,)
    return reward, given


def accuracy_reward_name(names, chosen=""):
    """The run's accuracy reward (what the shapers and all_correct/all_wrong read): --accuracy_reward when given, else
    the first of --rewards' names containing "accuracy", else "accuracy"."""
    return chosen or reward_of_kind(names, "accuracy") or "accuracy"


# a rollout's scores, row by row (B*G,): per reward (R, B*G), the weighted total with the bonuses, the run's accuracy
# reward, and which rows got each shaper's bonus ({"<name>_rewards": (B*G,)}); rows can be picked from several rollouts
Scores = collections.namedtuple("Scores", "per_reward reward accuracy bonuses")


def pick_groups(rollouts, groups, G):
    """The Scores of chosen groups of several rollouts (--dynamic_sampling): rollouts [Scores], groups [(rollout r, group
    b)] -> Scores of len(groups) * G rows, group by group in that order."""
    pick = lambda get: torch.cat([get(rollouts[r])[..., b * G:(b + 1) * G] for r, b in groups], dim=-1)  # (..., B*G)
    return Scores(pick(lambda s: s.per_reward), pick(lambda s: s.reward), pick(lambda s: s.accuracy),
                  {k: pick(lambda s, k=k: s.bonuses[k]) for k in rollouts[0].bonuses})


def score(run, batch, completions, shuffled, lengths):
    """train.py's rewards of B*G completions, completion i answering prompt i // G (Scores), each reward scored once.
    run: train.Run (cfg, reward_funcs, reward_weights, accuracy_reward, G_shuffled); batch["columns"]: the rows'.
    shuffled: T-GRPO's B*G~ completions on the shuffled videos, or None; lengths (B*G,): tokens, EOS included."""
    cfg, G, columns = run.cfg, run.cfg.num_generations, batch["columns"]  # per prompt; a reward takes what it names
    per_reward, reward = compute_rewards(run.reward_funcs, run.reward_weights, completions, batch["solution"], G, **columns)  # (R, B*G), (B*G,)
    score_accuracy = lambda texts, n: compute_rewards([run.accuracy_reward], [1.0], texts, batch["solution"], n, **columns)[1]
    accuracy = (per_reward[run.reward_funcs.index(run.accuracy_reward)] if run.accuracy_reward in run.reward_funcs
                else score_accuracy(completions, G))                                           # (B*G,): scored once
    inputs = dict(accuracy=accuracy, lengths=lengths, group_size=G, shuffled_group_size=run.G_shuffled,
                  shuffled_accuracy=None if shuffled is None else score_accuracy(shuffled, run.G_shuffled),  # (B*G~,)
                  has_video=torch.tensor([kind == "video" for kind in batch["data_type"]]))  # (B,): T-GRPO only on videos
    # bonuses go to the total reward; rewards/<name> stay the raw scores, as Video-R1's first trainer logs
    reward, bonuses = apply_shapers({n: s for n, s in SHAPERS.items() if getattr(cfg, s.flag)}, reward, inputs, cfg)
    return Scores(per_reward, reward, accuracy, bonuses)


def score_metrics(scores, G):
    """The accuracy-based metrics of the rows trained on: all_correct, all_wrong, the share given each bonus."""
    return {**dict(zip(("all_correct", "all_wrong"), signal_groups(scores.accuracy, G))),
            **{name: rows.mean().item() for name, rows in scores.bonuses.items()}}


def reward_of_kind(names, kind):
    """The first of a run's reward names that contains `kind` ("accuracy", "format"), else None. Without
    --accuracy_reward the run's accuracy reward is reward_of_kind(names, "accuracy") or "accuracy" (accuracy_reward_name):
    --rewards video_r1_first_accuracy,video_r1_format reads video_r1_first_accuracy, a user's my_accuracy reads that."""
    return next((n for n in names if kind in n), None)


# ----------------------------------------------------------------------------------------------------------------
# Video-R1's later trainer (src/r1-v/src/open_r1/grpo.py, accuracy_reward) and eval script (src/eval_bench.py,
# reward_fn), rule for rule

def _video_r1_answer(text):
    r"""Its extract_answer: the stripped group of the FIRST re.search(r'<answer>\s*(.*?)\s*</answer>', DOTALL), else ""."""
    match = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
    return match.group(1).strip() if match else ""


def _video_r1_number(text):
    """Its normalize_number: float() of the text without commas, else None ("1e3", " 7 ", "nan", "inf" are numbers)."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _video_r1_numerical(output_ans, gt_ans):
    """Its numerical rule: both or neither side has a "." or ",", and the numbers agree after round(x, 2)."""
    if (("." in gt_ans) or ("," in gt_ans)) != (("." in output_ans) or ("," in output_ans)):
        return 0.0
    gt, out = _video_r1_number(gt_ans), _video_r1_number(output_ans)
    if gt is None or out is None:
        return 0.0
    return 1.0 if round(gt, 2) == round(out, 2) else 0.0


def _rouge_mean_f(reference, hypothesis):
    """The mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score 0.1.2, Porter stemmer), as its
    compute_rouge_score."""
    from rouge_score import rouge_scorer
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(reference, hypothesis)
    return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3


def _video_r1_accuracy_one(content, sol, problem_type):
    if not isinstance(content, str) or not isinstance(sol, str):
        return 0.0  # its re.search raised TypeError, swallowed: 0.0
    output_ans, gt_ans = _video_r1_answer(content), _video_r1_answer(sol)
    if problem_type == "multiple choice":
        return 1.0 if output_ans.strip() == gt_ans.strip() else 0.0
    if problem_type == "numerical":
        return _video_r1_numerical(output_ans, gt_ans)
    if problem_type == "OCR":
        return max(0.0, min(1.0, 1 - word_error_rate(gt_ans, output_ans)))
    if problem_type == "free-form":
        return max(0.0, min(1.0, _rouge_mean_f(gt_ans, output_ans)))
    if problem_type == "regression":
        gt, out = _video_r1_number(gt_ans), _video_r1_number(output_ans)
        if gt is None or out is None:
            return 0.0  # it set 0.0, then abs(None - x) raised TypeError, swallowed: 0.0 all the same
        rel_diff = (abs(out - gt) + 1e-9) / (abs(gt) + 1e-9)
        # max(0.0, nan) is 0.0: a "nan" answer scores 1.0, as in its code
        return 1 - min(1.0, max(0.0, rel_diff))
    return 0.0


def video_r1_accuracy(completions, solutions, problem_type=None, **kwargs):
    r"""Video-R1's later accuracy_reward (src/r1-v/src/open_r1/grpo.py), each completion by its own row's problem_type
    (it took the first row's type for the whole batch: the same at its one prompt per GPU). answer = the stripped
    text of the FIRST <answer>\s*(.*?)\s*</answer> (DOTALL), "" without one, on both sides (an untagged solution
    is "", so a completion without a tag matches it as multiple choice).
        multiple choice  string equality of the two answers ("B." != "B")
        numerical        0.0 if one side has a "." or "," and the other not; else float() of each without commas,
                         equal after round(x, 2) (so "1e3" == "1000", "nan" never equal)
        OCR              1 - word error rate (case-sensitive words), clipped to [0, 1]
        free-form        mean of ROUGE-1/2/L F-measures (rouge-score, stemmer on), clipped to [0, 1]
        regression       1 - clip((|out - gt| + 1e-9) / (|gt| + 1e-9), 0, 1): partial credit; a truth of 0 scores
                         0.0 even for "0"; "nan" scores 1.0 (max(0.0, nan) is 0.0); a non-number 0.0
        other types      0.0
    Its try/except turned every error into 0.0; the two it could meet are kept as 0.0: a non-string completion, and
    a regression answer that is not a number (its code set 0.0, then computed with None and raised). Its prints and
    DEBUG_MODE log are not reproduced."""
    completions, solutions = list(completions), list(solutions)
    types = list(problem_type) if problem_type is not None else ["numerical"] * len(completions)
    if not len(types) == len(solutions) == len(completions):
        raise ValueError(f"video_r1_accuracy: {len(completions)} completions, {len(solutions)} solutions, "
                         f"{len(types)} problem types")
    return [_video_r1_accuracy_one(c, s, t) for c, s, t in zip(completions, solutions, types)]


def video_r1_mra(pred, truth):
    """eval_bench.py's mean_relative_accuracy, in float32 torch as it computes it: rel = |pred - truth| / (|truth| +
    1e-8), thresholds torch.arange(0.5, 0.975, 0.05) (ten), the share with rel < 1 - threshold."""
    pred, truth = torch.tensor(pred, dtype=torch.float32), torch.tensor(truth, dtype=torch.float32)
    rel_error = torch.abs(pred - truth) / (torch.abs(truth) + 1e-8)
    thresholds = torch.arange(0.5, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)  # (10,)
    return (rel_error < (1 - thresholds)).float().mean().item()


def video_r1_prediction(output):
    """eval_bench.py's prediction: the answer (as _video_r1_answer), or the whole output when that is ""."""
    return _video_r1_answer(output) or output


def video_r1_eval_reward(output, solution, problem_type):
    """eval_bench.py's reward_fn for one output: the answer falls back to the whole output (video_r1_prediction);
        multiple choice  stripped string equality
        numerical        as video_r1_accuracy's
        regression       video_r1_mra(float(pred), float(truth)), 0.0 if either is not a number
        other types      0.0 (OCR and free-form rows count as wrong in its mean_acc)"""
    if not isinstance(output, str) or not isinstance(solution, str):
        return 0.0  # its try/except: 0.0
    output_ans, gt_ans = video_r1_prediction(output), _video_r1_answer(solution)
    if problem_type == "multiple choice":
        return 1.0 if output_ans.strip() == gt_ans.strip() else 0.0
    if problem_type == "numerical":
        return _video_r1_numerical(output_ans, gt_ans)
    if problem_type == "regression":
        gt, out = _video_r1_number(gt_ans), _video_r1_number(output_ans)
        return 0.0 if gt is None or out is None else video_r1_mra(out, gt)
    return 0.0


REWARD_FUNCS = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "video_r1_first_accuracy": video_r1_first_accuracy,  # --rewards video_r1_first_accuracy,video_r1_format: Video-R1's first trainer's reward signal
    "video_r1_format": video_r1_format,
    "video_r1_accuracy": video_r1_accuracy,  # --rewards video_r1_accuracy,video_r1_format: Video-R1's later reward signal
}
