"""Table-driven tests for rewards.py, including known reward hacks and timing bounds."""

import math
import time

import pytest

from rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    answer_diversity,
    answer_key,
    call_reward,
    extract_answer,
    format_reward,
    option_letter,
    parse_options,
    findings_metrics,
    thinking_stats,
    thinking_text,
)

# (completion, expected format reward, id)
FORMAT_CASES = [
    ("<think>count the cars</think><answer>3</answer>", 1.0, "basic"),
    ("<think>a</think>\n\n<answer>3</answer>", 1.0, "newlines-between-blocks"),
    ("  \n<think>a</think> <answer>B</answer>\n ", 1.0, "outer-whitespace-stripped"),
    ("<think>\n</think><answer>3</answer>", 1.0, "empty-think-ok"),
    ("<think></think><answer>3</answer>", 1.0, "empty-think-no-ws-ok"),
    ("<think>a</think><answer>two cats</answer>", 1.0, "text-answer"),
    ("<think>a</think><answer></answer>", 0.0, "hack-empty-answer"),
    ("<think>a</think><answer>  \n\t</answer>", 0.0, "hack-whitespace-answer"),
    ("<answer>3</answer>", 0.0, "no-think"),
    ("<think>a</think>", 0.0, "no-answer"),
    ("<think>a</think>3", 0.0, "bare-answer"),
    ("Sure! <think>a</think><answer>3</answer>", 0.0, "text-before"),
    ("<think>a</think><answer>3</answer> done", 0.0, "text-after"),
    ("<think>a</think>so<answer>3</answer>", 0.0, "text-between"),
    ("<think>a</think><answer>3</answer><answer>4</answer>", 0.0, "hack-two-answer-blocks"),
    ("<think>a</think><answer>3</answer>\n<answer>4</answer>", 0.0, "hack-two-answer-blocks-ws"),
    ("<think>a<think>b</think></think><answer>3</answer>", 0.0, "nested-think"),
    ("<think>a</think><think>b</think><answer>3</answer>", 0.0, "repeated-think"),
    ("<think>a<answer>3</answer></think><answer>3</answer>", 0.0, "answer-inside-think"),
    ("<think>a</think><answer><answer>3</answer></answer>", 0.0, "nested-answer"),
    ("<think>a</think><answer>3</think></answer>", 0.0, "think-tag-inside-answer"),
    ("<THINK>a</THINK><ANSWER>3</ANSWER>", 0.0, "uppercase-tags"),
    ("<Think>a</Think><answer>3</answer>", 0.0, "mixed-case-think"),
    ("<think>a</think><answer>", 0.0, "unclosed-answer"),
    ("<think>a</think><answer></answer></answer>", 0.0, "answer-is-a-close-tag"),
    ("<think>a<answer></think>", 0.0, "truncated"),
    ("", 0.0, "empty-string"),
    (None, 0.0, "none"),
    (42, 0.0, "int"),
    (["<think>a</think><answer>3</answer>"], 0.0, "list"),
]


@pytest.mark.parametrize(
    "completion,expected", [c[:2] for c in FORMAT_CASES], ids=[c[2] for c in FORMAT_CASES]
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([completion], ["3"]) == [expected]  # solutions are ignored


# (completion, solution, expected accuracy reward, id)
ACCURACY_CASES = [
    ("<think>a</think><answer>3</answer>", "3", 1.0, "exact"),
    ("<think>a</think><answer>3</answer>", "<answer>3</answer>", 1.0, "solution-with-tags"),
    ("<think>a</think><answer>3</answer>", " <answer> 3 </answer>\n", 1.0, "solution-tags-ws"),
    ("<think>a</think><answer>4</answer>", "<answer>3</answer>", 0.0, "wrong-number"),
    ("<think>a</think><answer>3.0</answer>", "3", 1.0, "num-3.0"),
    ("<think>a</think><answer>3.</answer>", "3", 1.0, "num-3-dot"),
    ("<think>a</think><answer>+3</answer>", "3", 1.0, "num-plus"),
    ("<think>a</think><answer>03</answer>", "3", 1.0, "num-leading-zero"),
    ("<think>a</think><answer>3</answer>", "3.000", 1.0, "num-solution-decimal"),
    ("<think>a</think><answer>-0</answer>", "0", 1.0, "num-neg-zero"),
    ("<think>a</think><answer>-3</answer>", "3", 0.0, "num-sign-matters"),
    ("<think>a</think><answer>3.01</answer>", "3", 0.0, "num-close-not-equal"),
    ("<think>a</think><answer>1" + "0" * 40 + "1</answer>", "1" + "0" * 41, 0.0, "num-huge-exact"),
    ("<think>a</think><answer>three</answer>", "3", 0.0, "word-vs-number"),
    ("<think>a</think><answer>Two  Red\nCars</answer>", "two red cars", 1.0, "text-case-ws"),
    ("<think>a</think><answer>B</answer>", "b", 1.0, "option-letter-case"),
    ("<think>a</think><answer>B</answer>", "C", 0.0, "option-letter-wrong"),
    ("<think>a</think><answer>redcar</answer>", "red car", 0.0, "text-ws-not-removed"),
    ("<think>a</think><answer></answer>", "3", 0.0, "hack-empty-answer"),
    ("<think>a</think><answer>   </answer>", "3", 0.0, "hack-whitespace-answer"),
    ("<think>a</think><answer></answer>", "", 0.0, "hack-blank-vs-blank-truth"),
    ("<think>the answer is 3</think><answer>4</answer>", "3", 0.0, "hack-number-only-in-think"),
    ("<think>the answer is 3</think>", "3", 0.0, "hack-think-only"),
    ("3", "3", 0.0, "hack-bare-number"),
    ("The answer is 3.", "3", 0.0, "hack-bare-sentence"),
    ("<think>a</think><answer>3</answer><answer>4</answer>", "3", 0.0, "two-blocks-last-wins-wrong"),
    ("<think>a</think><answer>4</answer><answer>3</answer>", "3", 1.0, "two-blocks-last-wins-right"),
    ("junk <answer>3</answer> junk", "3", 1.0, "accuracy-ignores-format"),
    ("<ANSWER>3</ANSWER>", "3", 0.0, "uppercase-tags"),
    ("<think>a</think><answer>3", "3", 0.0, "unclosed-answer"),
    ("<think>a</think><answer>3</answer>", None, 0.0, "none-solution"),
    (None, "3", 0.0, "none-completion"),
    (3, "3", 0.0, "int-completion"),
    ({"content": "<answer>3</answer>"}, "3", 0.0, "dict-completion"),
]


@pytest.mark.parametrize(
    "completion,solution,expected",
    [c[:3] for c in ACCURACY_CASES],
    ids=[c[3] for c in ACCURACY_CASES],
)
def test_accuracy_reward(completion, solution, expected):
    assert accuracy_reward([completion], [solution]) == [expected]


# (text, expected extract_answer, id)
EXTRACT_CASES = [
    ("<answer> 3 </answer>", "3", "stripped"),
    ("<answer>1</answer><answer>2</answer>", "2", "last-open"),
    ("<answer>1</answer><answer>2", None, "last-open-unclosed"),
    ("<answer>a</answer>b</answer>", "a", "first-close-after"),
    ("</answer><answer>", None, "close-before-open"),
    ("<answer></answer>", "", "empty"),
    ("no tags", None, "no-tags"),
    (None, None, "none"),
]


@pytest.mark.parametrize(
    "text,expected", [c[:2] for c in EXTRACT_CASES], ids=[c[2] for c in EXTRACT_CASES]
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# (text, expected thinking_text, id)
THINKING_CASES = [
    ("<think>abc</think><answer>3</answer>", "abc", "basic"),
    ("<think></think><answer>3</answer>", "", "empty"),
    ("<think>a</think><think>b</think>", "a", "first-pair"),
    ("<think>a<think>b</think>", "b", "innermost-pair"),
    ("<think>unclosed", None, "unclosed"),
    ("</think><think>x", None, "close-before-open"),
    ("<answer>3</answer>", None, "no-think"),
    (None, None, "none"),
]


@pytest.mark.parametrize(
    "text,expected", [c[:2] for c in THINKING_CASES], ids=[c[2] for c in THINKING_CASES]
)
def test_thinking_text(text, expected):
    assert thinking_text(text) == expected


def test_batch_returns_one_float_per_completion():
    comps = ["<think>a</think><answer>3</answer>", None, "<answer>4</answer>", "3"]
    sols = ["3", "3", "<answer>4</answer>", "3"]
    assert accuracy_reward(comps, sols) == [1.0, 0.0, 1.0, 0.0]
    assert format_reward(comps, sols) == [1.0, 0.0, 0.0, 0.0]


def test_accuracy_length_mismatch_raises():
    with pytest.raises(ValueError, match=r"3.*2"):
        accuracy_reward(["a", "b", "c"], ["a", "b"])


def test_registry():
    assert set(REWARD_FUNCS) >= {"accuracy", "format"}
    assert REWARD_FUNCS["accuracy"] is accuracy_reward
    assert REWARD_FUNCS["format"] is format_reward
    comps = ["<think>a</think><answer>3</answer>", "nope", None]
    sols = ["3", "3", "3"]
    for name, fn in REWARD_FUNCS.items():
        out = fn(comps, sols)
        assert len(out) == len(comps), name
        assert all(type(x) is float for x in out), name


N = 200_000
LONG_INPUTS = [
    ("<think>" + "x" * N + "</think><answer>3</answer>", "3", 1.0, 1.0, "long-think"),
    ("<think>a</think><answer>" + "7" * N + "</answer>", "7" * N, 1.0, 1.0, "long-number"),
    ("<think>a</think><answer>" + "7" * N + "</answer>", "7" * (N - 1) + "8", 1.0, 0.0, "long-number-wrong"),
    ("<think>a</think><answer>" + "word " * (N // 5) + "</answer>", "WORD " * (N // 5), 1.0, 1.0, "long-text"),
    ("<answer>" * 20_000, "3", 0.0, 0.0, "repeated-answer-open"),
    ("<answer>" * 20_000 + "3</answer>", "3", 0.0, 1.0, "repeated-answer-open-closed"),
    ("<answer>3</answer>" * 20_000, "3", 0.0, 1.0, "repeated-answer-blocks"),
    ("<think>" + "</answer>" * 20_000 + "</think><answer>3</answer>", "3", 0.0, 1.0, "repeated-close-in-think"),
    ("<think>" * 20_000 + "</think>" * 20_000, "3", 0.0, 0.0, "repeated-think"),
    ("<think>a</think><answer>" + "<" * N + "</answer>", "3", 1.0, 0.0, "many-angle-brackets"),
]


@pytest.mark.parametrize(
    "completion,solution,fmt,acc",
    [c[:4] for c in LONG_INPUTS],
    ids=[c[4] for c in LONG_INPUTS],
)
def test_long_inputs_are_fast(completion, solution, fmt, acc):
    # A quadratic implementation takes seconds-to-minutes on these; linear takes ms.
    t0 = time.perf_counter()
    assert format_reward([completion], [solution]) == [fmt]
    assert accuracy_reward([completion], [solution]) == [acc]
    assert thinking_text(completion) is None or isinstance(thinking_text(completion), str)
    assert time.perf_counter() - t0 < 0.5


# ----------------------------------------------------------------------------- Video-R1's first trainer's rules

# (completion, solution, video_r1_first_accuracy, ours): where the two rule sets disagree, both ways, and where they agree
VIDEO_R1_FIRST_ACCURACY_CASES = [
    ("3", "<answer>3</answer>", 1.0, 0.0, "bare-number-first-only"),
    ("The answer is 3.", "3", 1.0, 0.0, "untagged-solution-math-verify-fires"),
    ("<think>a</think>\n<answer>\\boxed{3}</answer>", "3", 1.0, 0.0, "boxed-math-verify"),
    ("<think>a</think><answer>3.0</answer>", "<answer>3</answer>", 0.0, 1.0, "3.0-is-not-3-as-strings"),
    ("<think>a</think><answer>3.0</answer>", "3", 0.0, 1.0, "3.0-untagged-solution"),
    ("<think>a</think><answer>2</answer><answer>3</answer>", "<answer>3</answer>", 0.0, 1.0, "first-takes-first-block"),
    ("<think>a</think><answer>3</answer><answer>2</answer>", "<answer>3</answer>", 1.0, 0.0, "ours-takes-last-block"),
    ("<think>a</think><answer>3\n</answer>", "<answer>3</answer>", 0.0, 1.0, "no-dotall-answer-over-two-lines"),
    ("<think>a</think><answer>three</answer>", "<answer>Three</answer>", 0.0, 1.0, "case-sensitive-strings"),
    ("<think>3</think><answer> 3 </answer>", "<answer>3</answer>", 1.0, 1.0, "stripped-both"),
    ("<think>a</think><answer>4</answer>", "<answer>3</answer>", 0.0, 0.0, "wrong"),
]


@pytest.mark.parametrize("completion,solution,first,ours",
                         [c[:4] for c in VIDEO_R1_FIRST_ACCURACY_CASES], ids=[c[4] for c in VIDEO_R1_FIRST_ACCURACY_CASES])
def test_video_r1_first_accuracy(completion, solution, first, ours):
    from rewards import video_r1_first_accuracy
    pytest.importorskip("math_verify")
    assert video_r1_first_accuracy([completion], [solution], problem_type="numerical", options=None) == [first]
    assert accuracy_reward([completion], [solution]) == [ours]


VIDEO_R1_FORMAT_CASES = [
    (" <think>a</think><answer>3</answer>", 0.0, 1.0, "leading-space"),
    ("<think>a</think><answer>3</answer>\n", 0.0, 1.0, "trailing-newline"),
    ("<think>a</think><answer></answer>", 1.0, 0.0, "empty-answer"),
    ("<think>a</think><answer>1</answer><think>b</think><answer>2</answer>", 1.0, 0.0, "second-pair"),
    ("<think>a</think>x<answer>3</answer>", 0.0, 0.0, "text-between"),
    ("<think>a\nb</think>\n<answer>3</answer>", 1.0, 1.0, "multiline-ok"),
]


@pytest.mark.parametrize("completion,first,ours", [c[:3] for c in VIDEO_R1_FORMAT_CASES], ids=[c[3] for c in VIDEO_R1_FORMAT_CASES])
def test_video_r1_format(completion, first, ours):
    from rewards import video_r1_format
    assert video_r1_format([completion], ["3"], problem_type="numerical") == [first]
    assert format_reward([completion]) == [ours]


def test_video_r1_first_rules_registered():
    assert {"video_r1_first_accuracy", "video_r1_format"} <= set(REWARD_FUNCS)
# ----------------------------------------------------------------------------------------------------------------
# Video-R1's first trainer's newer bonuses (T-GRPO, length control) and the learning-signal metrics, against naive transcriptions
# of its code, one group at a time, on hand-made groups

import torch  # noqa: E402

from rewards import length_bonus, signal_groups, temporal_bonus  # noqa: E402


def naive_temporal_bonus(acc, shuffled_acc, has_video, G, Gs, alpha, mu):
    bonus, given = [], []
    for b in range(len(has_video)):
        normal, shuffled = acc[b * G:(b + 1) * G], shuffled_acc[b * Gs:(b + 1) * Gs]
        ok = has_video[b] and sum(normal) / G >= mu * (sum(shuffled) / Gs)
        given.append(ok)
        bonus += [alpha if ok and a > 0.1 else 0.0 for a in normal]
    return bonus, given


def naive_length_bonus(acc, lengths, G, lo, hi, bonus):
    out = []
    for b in range(0, len(acc), G):
        correct = [i for i in range(b, b + G) if acc[i] > 0.1]
        out += [bonus if len(correct) > 1 and i in correct and lo <= lengths[i] <= hi else 0.0 for i in range(b, b + G)]
    return out


def test_temporal_bonus_matches_naive_on_hand_made_groups():
    G, Gs = 4, 2
    groups = [  # (normal accuracies, shuffled accuracies, has video)
        ([1, 1, 0, 0], [1, 0], True),    # p 0.5 >= 0.8 * 0.5: the two correct ones get the bonus
        ([1, 0, 0, 0], [1, 1], True),    # p 0.25 < 0.8 * 1: shuffled frames do better, no bonus
        ([1, 1, 1, 1], [1, 1], True),    # p 1 >= 0.8: all four
        ([0, 0, 0, 0], [0, 0], True),    # 0 >= 0: given, but no completion is correct
        ([1, 1, 0, 0], [0, 0], False),   # no video: never
        ([1, 0.05, 0, 1], [0.5, 0.5], True),  # an accuracy of 0.05 is not > 0.1
    ]
    acc = [a for g in groups for a in g[0]]
    shuffled = [a for g in groups for a in g[1]]
    has_video = [g[2] for g in groups]
    bonus, given = temporal_bonus(torch.tensor(acc), torch.tensor(shuffled), torch.tensor(has_video), G, Gs, alpha=0.3, mu=0.8)
    ref_bonus, ref_given = naive_temporal_bonus(acc, shuffled, has_video, G, Gs, 0.3, 0.8)
    torch.testing.assert_close(bonus, torch.tensor(ref_bonus))
    assert given.tolist() == ref_given == [True, False, True, True, False, True]
    assert bonus.view(-1, G).gt(0).sum(1).tolist() == [2, 0, 4, 0, 0, 2]


def test_temporal_bonus_random_groups_match_naive():
    torch.manual_seed(0)
    for _ in range(20):
        B, G, Gs = 3, 6, 3
        acc, shuffled = torch.randint(0, 2, (B * G,)).float(), torch.randint(0, 2, (B * Gs,)).float()
        has_video = torch.rand(B) > 0.2
        mu, alpha = float(torch.rand(1)), 0.3
        bonus, given = temporal_bonus(acc, shuffled, has_video, G, Gs, alpha=alpha, mu=mu)
        ref_bonus, ref_given = naive_temporal_bonus(acc.tolist(), shuffled.tolist(), has_video.tolist(), G, Gs, alpha, mu)
        torch.testing.assert_close(bonus, torch.tensor(ref_bonus))
        assert given.tolist() == ref_given


def test_length_bonus_matches_naive_on_hand_made_groups():
    G = 4
    acc = [1, 1, 0, 1,       # three correct: the two inside [320, 512] get it (the window's ends included)
           1, 0, 0, 0,       # one correct: never, however long
           0, 0, 0, 0,       # none correct
           1, 1, 1, 1]       # all correct, lengths outside the window on both sides
    lengths = [320, 512, 400, 513,
               400, 400, 400, 400,
               400, 400, 400, 400,
               319, 600, 100, 400]
    out = length_bonus(torch.tensor(acc, dtype=torch.float32), torch.tensor(lengths, dtype=torch.float32), G,
                       window=(320, 512), bonus=0.2)
    ref = naive_length_bonus(acc, lengths, G, 320, 512, 0.2)
    torch.testing.assert_close(out, torch.tensor(ref))
    assert out.gt(0).tolist() == [True, True, False, False] + [False] * 8 + [False, False, False, True]


def test_length_bonus_random_groups_match_naive():
    torch.manual_seed(1)
    for _ in range(20):
        acc = torch.randint(0, 2, (12,)).float()
        lengths = torch.randint(0, 60, (12,)).float()
        out = length_bonus(acc, lengths, 3, window=(8, 48), bonus=0.5)
        torch.testing.assert_close(out, torch.tensor(naive_length_bonus(acc.tolist(), lengths.tolist(), 3, 8, 48, 0.5)))


def test_signal_groups_count_all_correct_and_all_wrong_groups():
    acc = torch.tensor([1, 1, 1,  0, 0, 0,  1, 0, 1,  0, 0, 0,  1, 1, 1.])
    all_correct, all_wrong = signal_groups(acc, 3)
    groups = [acc[i:i + 3].tolist() for i in range(0, 15, 3)]
    assert all_correct == pytest.approx(sum(all(a == 1 for a in g) for g in groups) / 5) and all_correct > 0
    assert all_wrong == pytest.approx(sum(all(a == 0 for a in g) for g in groups) / 5) and all_wrong > 0
# ---------------------------------------------------------------------------------------------------------------
# answer types: multiple choice, numerical, free-form

OPTIONS = ["A. red cube", "B. blue sphere", "C. green cylinder", "D. yellow cone"]


def _ans(text, thought="let me look"):
    return f"<think>{thought}</think><answer>{text}</answer>"


# options as real multiple-choice sets write them (Video-R1-260k, NExT-QA, MVBench): texts that start with an article,
# hold a one-letter word, are lowercase, five options. (answer, truth, options, expected)
ARTICLES = ["A. A red cube", "B. A blue sphere", "C. Vitamin C", "D. I don't know"]
NEXTQA = ["A. the man picks up the ball", "B. a dog runs away", "C. she waves at the camera", "D. nothing happens",
          "E. they sit down"]
REAL_MC = [
    ("B. A blue sphere", "<answer>B</answer>", ARTICLES, 1.0),
    ("(B) A blue sphere", "<answer>B</answer>", ARTICLES, 1.0),
    ("B) a blue sphere.", "<answer>B</answer>", ARTICLES, 1.0),
    ("C. Vitamin C", "<answer>C</answer>", ARTICLES, 1.0),
    ("D: I don't know", "<answer>D</answer>", ARTICLES, 1.0),
    ("A blue sphere", "<answer>B</answer>", ARTICLES, 1.0),  # the text alone: its first word is not option A
    ("I don't know", "<answer>D</answer>", ARTICLES, 1.0),
    ("B", "<answer>B. A blue sphere</answer>", ARTICLES, 1.0),  # a truth that carries its option's text
    ("B. A blue sphere", "B. A blue sphere", ARTICLES, 1.0),
    ("A", "<answer>B. A blue sphere</answer>", ARTICLES, 0.0),
    ("A. A red cube", "<answer>B. A blue sphere</answer>", ARTICLES, 0.0),
    ("B. A red cube", "<answer>B</answer>", ARTICLES, 0.0),  # a letter with another option's text
    ("B. C", "<answer>B</answer>", ARTICLES, 0.0),
    ("C", "<answer>C. Vitamin C</answer>", ARTICLES, 1.0),
    ("E. they sit down", "<answer>E</answer>", NEXTQA, 1.0),
    ("E", "<answer>E. they sit down</answer>", NEXTQA, 1.0),
    ("B. A dog runs away", "<answer>B</answer>", NEXTQA, 1.0),
    ("the man picks up the ball", "<answer>A</answer>", NEXTQA, 1.0),
    ("e", "<answer>E</answer>", NEXTQA, 0.0),
    ("A. I", "<answer>A</answer>", ["A. I", "B. you", "C. we"], 1.0),  # a one-letter option text
    ("I", "<answer>A</answer>", ["A. I", "B. you", "C. we"], 1.0),
    ("B", "<answer>B</answer>", ["A. I", "B. you", "C. we"], 1.0),
    ("C. we", "<answer>B</answer>", ["A. I", "B. you", "C. we"], 0.0),
]

# (completion, solution, problem_type, options, expected accuracy reward, id)
TYPED_CASES = [
    (_ans("B"), "<answer>B</answer>", "multiple choice", OPTIONS, 1.0, "mc-letter"),
    (_ans("B."), "<answer>B</answer>", "multiple choice", OPTIONS, 1.0, "mc-letter-dot"),
    (_ans("(B)"), "<answer>B</answer>", "multiple choice", OPTIONS, 1.0, "mc-letter-parens"),
    (_ans("B)"), "<answer>B</answer>", "multiple choice", OPTIONS, 1.0, "mc-letter-paren"),
    (_ans("B. blue sphere"), "<answer>B</answer>", "multiple choice", OPTIONS, 1.0, "mc-letter-and-text"),
    (_ans("B. Blue  Sphere."), "<answer>B</answer>", "multiple choice", OPTIONS, 1.0, "mc-letter-and-text-case"),
    (_ans(" B "), "B", "multiple choice", OPTIONS, 1.0, "mc-untagged-truth"),
    (_ans("B"), "<answer>B. blue sphere</answer>", "multiple choice", OPTIONS, 1.0, "mc-truth-with-text"),
    (_ans("C"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "mc-wrong-letter"),
    (_ans("b"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "mc-lowercase-letter"),
    (_ans("A and B"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-two-letters"),
    (_ans("B, C"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-two-letters-comma"),
    (_ans("B. C"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-letter-then-letter"),
    (_ans("B) or A)"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-letter-or-letter"),
    (_ans("AB"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-glued-letters"),
    (_ans("blue sphere"), "<answer>B</answer>", "multiple choice", OPTIONS, 1.0, "mc-option-text-alone"),
    (_ans("red cube or blue sphere"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-two-texts"),
    (_ans("B. red cube"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-letter-other-text"),
    (_ans("E"), "<answer>E</answer>", "multiple choice", OPTIONS, 0.0, "mc-letter-not-an-option"),
    (_ans(""), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "mc-blank"),
    (_ans("none", thought="B"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-letter-only-in-think"),
    ("<think>B</think>", "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-think-only"),
    ("B", "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "hack-mc-bare-letter"),
    (_ans("A"), "<answer>B</answer>", "multiple choice", OPTIONS, 0.0, "mc-first-letter-wrong"),
    (_ans("B"), "<answer>B</answer>", "multiple choice", None, 1.0, "mc-options-unknown"),
    (_ans("B. anything"), "<answer>B</answer>", "multiple choice", None, 1.0, "mc-options-unknown-text"),
    (_ans("B"), "<answer>B</answer>", "multiple choice", ["red cube", "blue sphere"], 1.0, "mc-unlettered-options"),
    (_ans("B. blue sphere"), "<answer>B</answer>", "multiple choice", ["red cube", "blue sphere"], 1.0,
     "mc-unlettered-options-text"),
    *[(_ans(answer), truth, "multiple choice", options, expected, f"mc-real-{i}")
      for i, (answer, truth, options, expected) in enumerate(REAL_MC)],
    (_ans("3.0"), "<answer>3</answer>", "numerical", None, 1.0, "num-as-today"),
    (_ans("three"), "<answer>3</answer>", "numerical", None, 0.0, "num-word"),
    (_ans("Two  Red Cars"), "<answer>two red cars</answer>", "free-form", None, 1.0, "free-normalised-exact"),
    (_ans("two red cars!"), "<answer>two red cars</answer>", "free-form", None, 0.0, "free-no-partial-credit"),
    (_ans("red cars"), "<answer>two red cars</answer>", "free-form", None, 0.0, "free-no-rouge"),
    (_ans("the answer", thought="two red cars"), "two red cars", "free-form", None, 0.0, "hack-free-only-in-think"),
    (_ans("B"), "<answer>b</answer>", "free-form", None, 1.0, "free-case-folded"),
]


@pytest.mark.parametrize("completion,solution,problem_type,options,expected", [c[:5] for c in TYPED_CASES],
                         ids=[c[5] for c in TYPED_CASES])
def test_accuracy_by_problem_type(completion, solution, problem_type, options, expected):
    assert accuracy_reward([completion], [solution], problem_type=[problem_type], options=[options]) == [expected]


def test_accuracy_default_type_is_numerical_and_unknown_type_raises():
    comps, sols = [_ans("3"), _ans("B")], ["3", "B"]
    assert accuracy_reward(comps, sols) == accuracy_reward(comps, sols, problem_type=["numerical"] * 2) == [1.0, 1.0]
    with pytest.raises(ValueError, match="essay"):
        accuracy_reward(comps[:1], sols[:1], problem_type=["essay"])
    with pytest.raises(ValueError, match="problem types"):
        accuracy_reward(comps, sols, problem_type=["numerical"])


def test_option_letter_and_parse_options():
    assert parse_options(OPTIONS) == {"A": "red cube", "B": "blue sphere", "C": "green cylinder", "D": "yellow cone"}
    assert parse_options(["x", "(B) y", "z"]) == {"A": "x", "B": "y", "C": "z"}
    assert [option_letter(a) for a in ("D", "D: yellow cone", "(D)", "", None, "D E", "d", "D. E", "(D) or (A)")] == \
        ["D", "D", "D", None, None, None, None, None, None]
    assert [option_letter(a, ARTICLES) for a in ("B. A blue sphere", "(B) A blue sphere", "C. Vitamin C", "A blue sphere",
                                                 "Vitamin C", "A", "A. A", "X", "A blue sphere and A red cube")] == \
        ["B", "B", "C", "B", "C", "A", None, None, None]


def test_call_reward_passes_only_what_a_reward_takes():
    seen = {}

    def plain(completions, solutions):
        return [0.5] * len(completions)

    def typed(completions, solutions, problem_type):
        seen["typed"] = problem_type
        return [1.0] * len(completions)

    def everything(completions, solutions, **kwargs):
        seen["everything"] = kwargs
        return [2.0] * len(completions)

    columns = dict(problem_type=["multiple choice"], options=[OPTIONS])
    assert call_reward(plain, ["c"], ["s"], **columns) == [0.5]
    assert call_reward(typed, ["c"], ["s"], **columns) == [1.0] and seen["typed"] == ["multiple choice"]
    assert call_reward(everything, ["c"], ["s"], **columns) == [2.0] and seen["everything"] == columns
    assert call_reward(lambda completions, solutions=None: [3.0], ["c"], ["s"], **columns) == [3.0]
    assert call_reward(format_reward, [_ans("B")], ["s"], **columns) == [1.0]


# ---------------------------------------------------------------------------------------------------------------
# Video-R1's first trainer's measures: thinking length, empty thoughts, answer variety within a group

def test_answer_key_parses_as_accuracy_does():
    assert [answer_key(_ans(a)) for a in ("3", "3.0", "03", "+3", "-0", "Two  Cars", "")] == \
        ["3", "3", "3", "3", "0", "two cars", "none"]
    assert answer_key("3") == "none" and answer_key(None) == "none"
    mc = [answer_key(_ans(a), "multiple choice", OPTIONS) for a in ("B", "(B)", "B. blue sphere", "A and B", "E")]
    assert mc == ["B", "B", "B", "none", "none"]


def test_answer_diversity_entropy_in_nats():
    prior = ["1"] * 8  # the tiny run's "answer 1 to everything": no variety
    assert answer_diversity(prior, 8) == (0.0, 1.0)
    spread = [str(k) for k in range(8)]
    entropy, mode = answer_diversity(spread, 8)
    assert entropy == pytest.approx(math.log(8)) and mode == pytest.approx(1 / 8)
    half = ["1", "1", "2", "2"]
    assert answer_diversity(half, 4) == (pytest.approx(math.log(2)), 0.5)
    # the mean over groups, each group on its own: [one answer] + [two halves]
    assert answer_diversity(["7"] * 4 + half, 4) == (pytest.approx(math.log(2) / 2), 0.75)
    with pytest.raises(AssertionError, match="groups of 4"):
        answer_diversity(["1"] * 6, 4)


def test_thinking_stats():
    comps = ["<think>one two three</think><answer>3</answer>", "<think>\n</think><answer>2</answer>",
             "<answer>1</answer>", None]
    length, empty = thinking_stats(comps, lambda text: len(text.split()))
    assert length == pytest.approx((3 + 0 + 0 + 0) / 4) and empty == pytest.approx(1 / 4)
    assert thinking_stats([], len) == (0.0, 0.0)


def test_findings_metrics_group_by_prompt_and_type():
    # two prompts x G=2: a numerical group that agrees, a multiple-choice group that does not
    completions = ["<think>a b</think><answer>3</answer>", "<think></think><answer>3.0</answer>",
                   "<think>c</think><answer>(B)</answer>", "<think>d e f</think><answer>B. red cube</answer>"]
    m = findings_metrics(completions, 2, lambda text: len(text.split()), problem_type=["numerical", "multiple choice"],
                     options=[[], OPTIONS])
    assert m["thinking_length"] == pytest.approx((2 + 0 + 1 + 3) / 4) and m["empty_thinking_ratio"] == 0.25
    # group 1: {3, 3} -> 0 nats; group 2: {B, none} -> log 2 (the letter with another option's text is no answer)
    assert m["answer_entropy"] == pytest.approx(math.log(2) / 2) and m["answer_mode_share"] == 0.75
    plain = findings_metrics(completions, 2, lambda text: len(text.split()))  # all numerical: "(B)" and "B. red cube" differ
    assert plain["answer_entropy"] == pytest.approx(math.log(2) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Video-R1-260k's other two types in our accuracy, and Video-R1's later rules (grpo.py, eval_bench.py) exactly

import re  # noqa: E402

import rewards  # noqa: E402

# (completion, solution, problem_type, expected accuracy reward, id): OCR = 1 - WER (case-folded), regression = MRA
OCR_REGRESSION_CASES = [
    (_ans("red blue green"), "<answer>red blue green</answer>", "OCR", 1.0, "ocr-exact"),
    (_ans("Red  BLUE green"), "<answer>red blue green</answer>", "OCR", 1.0, "ocr-case-and-spaces"),
    (_ans("red green"), "<answer>red blue green</answer>", "OCR", pytest.approx(2 / 3), "ocr-one-deleted"),
    (_ans("red blue blue green"), "<answer>red blue green</answer>", "OCR", pytest.approx(2 / 3), "ocr-one-inserted"),
    (_ans("a b c d e f g"), "<answer>red</answer>", "OCR", 0.0, "ocr-clipped-at-0"),
    (_ans(""), "<answer>red</answer>", "OCR", 0.0, "ocr-blank"),
    ("red", "<answer>red</answer>", "OCR", 0.0, "hack-ocr-no-tag"),
    (_ans("20"), "<answer>20</answer>", "regression", 1.0, "reg-exact"),
    (_ans("20.0"), "<answer>20</answer>", "regression", 1.0, "reg-exact-decimal"),
    (_ans("19"), "<answer>20</answer>", "regression", pytest.approx(0.9), "reg-5pct-off"),     # 0.05 < 1 - t for t < 0.95
    (_ans("18.5"), "<answer>20</answer>", "regression", pytest.approx(0.9), "reg-7.5pct-off"),
    (_ans("15"), "<answer>20</answer>", "regression", pytest.approx(0.5), "reg-25pct-off"),    # t = 0.50 .. 0.70
    (_ans("10"), "<answer>20</answer>", "regression", 0.0, "reg-half-off"),
    (_ans("0"), "<answer>0</answer>", "regression", 1.0, "reg-zero-truth-exact"),
    (_ans("1"), "<answer>0</answer>", "regression", 0.0, "reg-zero-truth-off"),
    (_ans("about 20"), "<answer>20</answer>", "regression", 0.0, "reg-not-a-number"),
]


@pytest.mark.parametrize("completion,solution,problem_type,expected", [c[:4] for c in OCR_REGRESSION_CASES],
                         ids=[c[4] for c in OCR_REGRESSION_CASES])
def test_accuracy_ocr_and_regression(completion, solution, problem_type, expected):
    assert accuracy_reward([completion], [solution], problem_type=[problem_type]) == [expected]


WER_CASES = [("a b c", "a b c"), ("a b c", "a x c"), ("a b c", "a c"), ("a b c", "a b b c"), ("a b c", ""),
             ("one two three four", "four three two one"), ("the cat sat on the mat", "the the cat sat mat on"),
             ("x", "y z w v"), ("A b", "a b"), ("a b c d e f", "b a c e d")]


@pytest.mark.parametrize("reference,hypothesis", WER_CASES)
def test_word_error_rate_matches_jiwer(reference, hypothesis):
    jiwer = pytest.importorskip("jiwer")
    assert rewards.word_error_rate(reference, hypothesis) == pytest.approx(jiwer.wer(reference, hypothesis))


def test_word_error_rate_of_an_empty_reference_counts_per_one_word():
    assert rewards.word_error_rate("", "") == 0.0 and rewards.word_error_rate("", "a b") == 2.0  # Video-R1's max(1, m)
    assert rewards.word_error_rate("red  blue\ngreen", "red blue green") == 0.0  # words split on any whitespace


def test_mean_relative_accuracy_thresholds():
    # relative errors just inside / outside each threshold's 1 - t: 0.5, 0.45, ..., 0.05
    assert [rewards.mean_relative_accuracy(100 + e, 100) for e in (0, 4, 6, 26, 49, 51, -49)] == \
        [1.0, 1.0, 0.9, 0.5, 0.1, 0.0, 0.1]


# (completion, solution, problem_type, expected video_r1_accuracy, id)
VIDEO_R1_CASES = [
    (_ans("B"), "<answer>B</answer>", "multiple choice", 1.0, "mc-equal"),
    (_ans(" B "), "<answer>B</answer>", "multiple choice", 1.0, "mc-stripped"),
    (_ans("B."), "<answer>B</answer>", "multiple choice", 0.0, "mc-string-not-letter"),
    (_ans("B. blue sphere"), "<answer>B</answer>", "multiple choice", 0.0, "mc-letter-and-text"),
    ("<answer>A</answer><answer>B</answer>", "<answer>B</answer>", "multiple choice", 0.0, "mc-first-answer-counts"),
    ("B", "B", "multiple choice", 1.0, "mc-untagged-both-empty"),
    ("<answer>\nB\n</answer>", "<answer>B</answer>", "multiple choice", 1.0, "mc-multiline"),
    (_ans("3"), "<answer>3</answer>", "numerical", 1.0, "num-equal"),
    (_ans("3.0"), "<answer>3</answer>", "numerical", 0.0, "num-decimal-mismatch"),
    (_ans("3.001"), "<answer>3.0</answer>", "numerical", 1.0, "num-rounded-to-2"),
    (_ans("3.01"), "<answer>3.0</answer>", "numerical", 0.0, "num-rounded-differs"),
    (_ans("1,000"), "<answer>1.000</answer>", "numerical", 0.0, "num-comma-is-thousands"),
    (_ans("1,000"), "<answer>1000.0</answer>", "numerical", 1.0, "num-comma-counts-as-decimal-mark"),
    (_ans("1e3"), "<answer>1000</answer>", "numerical", 1.0, "num-float-syntax"),
    (_ans("three"), "<answer>3</answer>", "numerical", 0.0, "num-word"),
    (_ans("nan"), "<answer>nan</answer>", "numerical", 0.0, "num-nan-never-equal"),
    (_ans("red blue green"), "<answer>red blue green</answer>", "OCR", 1.0, "ocr-exact"),
    (_ans("red green"), "<answer>red blue green</answer>", "OCR", pytest.approx(2 / 3), "ocr-wer"),
    (_ans("Red blue green"), "<answer>red blue green</answer>", "OCR", pytest.approx(2 / 3), "ocr-case-sensitive"),
    (_ans("a b c d e"), "<answer>red</answer>", "OCR", 0.0, "ocr-clipped"),
    (_ans("red cube"), "<answer>red cube</answer>", "free-form", pytest.approx(1.0), "free-exact"),
    # ROUGE-1 F 0.8, ROUGE-2 F 2/3, ROUGE-L F 0.8, by hand
    (_ans("red cube"), "<answer>a red cube</answer>", "free-form", pytest.approx((0.8 + 2 / 3 + 0.8) / 3), "free-rouge"),
    (_ans("red cubes"), "<answer>a red cube</answer>", "free-form", pytest.approx((0.8 + 2 / 3 + 0.8) / 3), "free-stemmed"),
    (_ans("blue sphere"), "<answer>a red cube</answer>", "free-form", 0.0, "free-no-overlap"),
    (_ans("20"), "<answer>20</answer>", "regression", pytest.approx(1 - 1e-9 / (20 + 1e-9)), "reg-exact-nearly-1"),
    (_ans("15"), "<answer>20</answer>", "regression", pytest.approx(0.75), "reg-relative-diff"),
    (_ans("50"), "<answer>20</answer>", "regression", 0.0, "reg-clipped"),
    (_ans("0"), "<answer>0</answer>", "regression", 0.0, "reg-zero-truth-scores-0"),
    (_ans("nan"), "<answer>20</answer>", "regression", 1.0, "reg-nan-scores-1"),
    (_ans("about 20"), "<answer>20</answer>", "regression", 0.0, "reg-not-a-number-swallowed"),
    (_ans("3"), "<answer>3</answer>", "essay", 0.0, "unknown-type"),
    (None, "<answer>3</answer>", "numerical", 0.0, "not-a-string-swallowed"),
]


@pytest.mark.parametrize("completion,solution,problem_type,expected", [c[:4] for c in VIDEO_R1_CASES],
                         ids=[c[4] for c in VIDEO_R1_CASES])
def test_video_r1_accuracy(completion, solution, problem_type, expected):
    assert rewards.video_r1_accuracy([completion], [solution], problem_type=[problem_type]) == [expected]


def test_video_r1_accuracy_scores_each_completion_by_its_own_type():
    comps = [_ans("B"), _ans("red green"), _ans("15")]
    sols = ["<answer>B</answer>", "<answer>red blue green</answer>", "<answer>20</answer>"]
    types = ["multiple choice", "OCR", "regression"]
    got = call_reward(REWARD_FUNCS["video_r1_accuracy"], comps, sols, problem_type=types, options=[OPTIONS, [], []])
    assert got == [1.0, pytest.approx(2 / 3), pytest.approx(0.75)]
    with pytest.raises(ValueError, match="problem types"):
        rewards.video_r1_accuracy(comps, sols, problem_type=types[:1])


def test_video_r1s_later_format_is_its_first_format():
    """grpo.py's format_reward: re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", content, re.DOTALL)."""
    def theirs(c):
        return 1.0 if re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", c, re.DOTALL) else 0.0
    cases = [c for c, _, _ in FORMAT_CASES if isinstance(c, str)] + [" <think>a</think><answer>1</answer>",
                                                                      "<think>a</think><answer>1</answer>\n"]
    assert rewards.video_r1_format(cases) == [theirs(c) for c in cases]


# (output, solution, problem_type, expected eval_bench reward_fn, id)
VIDEO_R1_EVAL_CASES = [
    (_ans("B"), "<answer>B</answer>", "multiple choice", 1.0, "mc-equal"),
    ("B", "<answer>B</answer>", "multiple choice", 1.0, "mc-fallback-whole-output"),
    (" B\n", "<answer>B</answer>", "multiple choice", 1.0, "mc-fallback-stripped"),
    ("The answer is B", "<answer>B</answer>", "multiple choice", 0.0, "mc-fallback-whole-sentence"),
    ("<answer></answer>B", "<answer>B</answer>", "multiple choice", 0.0, "mc-empty-answer-falls-back"),
    (_ans("3.0"), "<answer>3</answer>", "numerical", 0.0, "num-decimal-mismatch"),
    ("42", "<answer>42</answer>", "numerical", 1.0, "num-fallback"),
    (_ans("20"), "<answer>20</answer>", "regression", 1.0, "reg-exact"),
    (_ans("18.5"), "<answer>20</answer>", "regression", pytest.approx(0.9, abs=1e-6), "reg-mra"),
    (_ans("15"), "<answer>20</answer>", "regression", pytest.approx(0.5, abs=1e-6), "reg-mra-half"),
    ("15", "<answer>20</answer>", "regression", pytest.approx(0.5, abs=1e-6), "reg-fallback"),
    (_ans("nan"), "<answer>20</answer>", "regression", 0.0, "reg-nan"),
    (_ans("x"), "<answer>20</answer>", "regression", 0.0, "reg-not-a-number"),
    (_ans("red cube"), "<answer>red cube</answer>", "free-form", 0.0, "free-form-scores-0"),
    (_ans("red"), "<answer>red</answer>", "OCR", 0.0, "ocr-scores-0"),
]


@pytest.mark.parametrize("output,solution,problem_type,expected", [c[:4] for c in VIDEO_R1_EVAL_CASES],
                         ids=[c[4] for c in VIDEO_R1_EVAL_CASES])
def test_video_r1_eval_reward(output, solution, problem_type, expected):
    assert rewards.video_r1_eval_reward(output, solution, problem_type) == expected


def test_video_r1_mra_is_float32():
    # float32 rounding: 2/3 relative error of 0.4 of the thresholds, as eval_bench's torch code returns it
    assert rewards.video_r1_mra(2.0, 3.0) == pytest.approx(0.4) and rewards.video_r1_mra(2.0, 3.0) != 0.4
    assert rewards.video_r1_prediction("<think>x</think><answer> 7 </answer>") == "7"
    assert rewards.video_r1_prediction("7 apples") == "7 apples"
