"""Table-driven tests for rewards.py, including known reward hacks and timing bounds."""

import time

import pytest

from rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    extract_answer,
    format_reward,
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


# ----------------------------------------------------------------------------- the seed's rules

# (completion, solution, seed_accuracy, ours): where the two rule sets disagree, both ways, and where they agree
SEED_ACCURACY_CASES = [
    ("3", "<answer>3</answer>", 1.0, 0.0, "bare-number-seed-only"),
    ("The answer is 3.", "3", 1.0, 0.0, "untagged-solution-math-verify-fires"),
    ("<think>a</think>\n<answer>\\boxed{3}</answer>", "3", 1.0, 0.0, "boxed-math-verify"),
    ("<think>a</think><answer>3.0</answer>", "<answer>3</answer>", 0.0, 1.0, "3.0-is-not-3-as-strings"),
    ("<think>a</think><answer>3.0</answer>", "3", 0.0, 1.0, "3.0-untagged-solution"),
    ("<think>a</think><answer>2</answer><answer>3</answer>", "<answer>3</answer>", 0.0, 1.0, "seed-takes-first-block"),
    ("<think>a</think><answer>3</answer><answer>2</answer>", "<answer>3</answer>", 1.0, 0.0, "ours-takes-last-block"),
    ("<think>a</think><answer>3\n</answer>", "<answer>3</answer>", 0.0, 1.0, "no-dotall-answer-over-two-lines"),
    ("<think>a</think><answer>three</answer>", "<answer>Three</answer>", 0.0, 1.0, "case-sensitive-strings"),
    ("<think>3</think><answer> 3 </answer>", "<answer>3</answer>", 1.0, 1.0, "stripped-both"),
    ("<think>a</think><answer>4</answer>", "<answer>3</answer>", 0.0, 0.0, "wrong"),
]


@pytest.mark.parametrize("completion,solution,seed,ours",
                         [c[:4] for c in SEED_ACCURACY_CASES], ids=[c[4] for c in SEED_ACCURACY_CASES])
def test_seed_accuracy(completion, solution, seed, ours):
    from rewards import seed_accuracy
    pytest.importorskip("math_verify")
    assert seed_accuracy([completion], [solution], problem_type="numerical", options=None) == [seed]
    assert accuracy_reward([completion], [solution]) == [ours]


SEED_FORMAT_CASES = [
    (" <think>a</think><answer>3</answer>", 0.0, 1.0, "leading-space"),
    ("<think>a</think><answer>3</answer>\n", 0.0, 1.0, "trailing-newline"),
    ("<think>a</think><answer></answer>", 1.0, 0.0, "empty-answer"),
    ("<think>a</think><answer>1</answer><think>b</think><answer>2</answer>", 1.0, 0.0, "second-pair"),
    ("<think>a</think>x<answer>3</answer>", 0.0, 0.0, "text-between"),
    ("<think>a\nb</think>\n<answer>3</answer>", 1.0, 1.0, "multiline-ok"),
]


@pytest.mark.parametrize("completion,seed,ours", [c[:3] for c in SEED_FORMAT_CASES], ids=[c[3] for c in SEED_FORMAT_CASES])
def test_seed_format(completion, seed, ours):
    from rewards import seed_format
    assert seed_format([completion], ["3"], problem_type="numerical") == [seed]
    assert format_reward([completion]) == [ours]


def test_seed_rules_registered():
    assert {"seed_accuracy", "seed_format"} <= set(REWARD_FUNCS)
