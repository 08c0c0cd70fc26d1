"""lmms-eval scoring rules, one case per rule, traps and quirks of the reference code included."""

from __future__ import annotations

import doctest
import re
import string

import pytest

from hf_sparse_mllm.evaluation import metrics
from hf_sparse_mllm.evaluation.metrics import (
    MME_COGNITION_CATEGORIES,
    MME_PERCEPTION_CATEGORIES,
    exact_match,
    mme_scores,
    normalize_vqa_answer,
    parse_mme_prediction,
    pope_metrics,
    scienceqa_match,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------------------ GQA exact_match


@pytest.mark.parametrize(
    "prediction, target, expected",
    [
        ("yes", "yes", 1.0),
        ("Yes.", "yes", 1.0),  # case and punctuation ignored
        (" yes \n", "yes", 1.0),  # the harness strips the generation
        ("\tYes.\r\n", "yes", 1.0),
        ("yes", " yes", 0.0),  # but not the target
        ("yes", "yes\n", 0.0),
        ("t-shirt", "tshirt", 1.0),  # punctuation is deleted, not replaced by a space
        ("2.5", "25", 1.0),  # periods between digits too
        ("don't", "dont", 1.0),  # so is the apostrophe of a contraction
        ("t shirt", "tshirt", 0.0),  # inner whitespace counts
        ("yes  no", "yes no", 0.0),
        ("yes .", "yes", 0.0),  # "yes ." -> "yes "
        ("two", "2", 0.0),  # no number normalisation in GQA
        ("the dog", "dog", 0.0),  # nor article removal
        ("left", "right", 0.0),
    ],
)
def test_exact_match_gqa_defaults(prediction, target, expected):
    assert exact_match(prediction, target) == expected


@pytest.mark.parametrize("mark", list(string.punctuation))
def test_exact_match_deletes_each_ascii_punctuation_mark(mark):
    assert exact_match(f"{mark}ye{mark}s{mark}", "yes") == 1.0
    assert exact_match("yes", f"{mark}yes") == 1.0
    assert exact_match(f"ye{mark}s", "yes", ignore_punctuation=False) == 0.0


def test_exact_match_numpy_string_quirks():
    # lmms-eval compares NumPy string arrays: trailing NULs are not part of the value ...
    assert exact_match("yes\x00", "yes") == 1.0
    assert exact_match("yes!\x00", "yes") == 1.0
    assert exact_match("y\x00es", "yes") == 0.0
    # ... and np.char.lower keeps the array's width, cutting a lower-case form that is longer ("İ" -> "i̇").
    assert exact_match("İ", "i") == 1.0
    assert exact_match("İx", "i̇x") == 0.0
    assert exact_match("İ", "i̇", ignore_case=False) == 0.0
    assert exact_match("ΑΣ", "ας") == 1.0  # context-dependent lower-casing (final sigma), as str.lower


def test_exact_match_flags():
    assert exact_match("Yes", "yes", ignore_case=False) == 0.0
    assert exact_match("yes.", "yes", ignore_punctuation=False) == 0.0
    assert exact_match("Yes.", "Yes.", ignore_case=False, ignore_punctuation=False) == 1.0
    assert exact_match(" yes ", "yes", ignore_case=False, ignore_punctuation=False) == 1.0


# ------------------------------------------------------------------------------------------------ VQAv2


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),  # number words to digits, lower-case
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("a dog", "dog"),  # articles dropped
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions table
        ("Isnt it", "isn't it"),
        ("youre", "you're"),
        ("don't", "don't"),
        ("Im", "im"),  # capitalised keys of the table never match
        ("somebody'd", "somebodyd"),  # the table maps this one the wrong way round
        ("1,000", "1000"),  # a digit-comma-digit: every mark is deleted
        ("1,000 dogs, cats", "1000 dogs cats"),
        ("red,blue", "red blue"),  # otherwise a mark not touching a space becomes a space
        ("red / blue", "red blue"),  # and one touching a space is deleted
        ("red/blue", "red blue"),
        ("t-shirt", "t shirt"),
        ("what?", "what"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes.", "yes"),  # other periods go
        ("3.", "3"),
        ("dog's", "dog's"),  # apostrophes and colons are kept
        ("10:30", "10:30"),
        ("  Black\tand\nwhite ", "black and white"),
        ("black  and   white", "black and white"),
        ("." * 40, "." * 8),  # the reference removes at most 32 periods
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def _answers(matching: str, k: int, other: str = "cat", n: int = 10) -> list[str]:
    return [matching] * k + [other] * (n - k)


@pytest.mark.parametrize(
    "k, expected",
    [
        # acc = mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3):
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # 1.0
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out(k, expected):
    assert vqa_accuracy("dog", _answers("dog", k)) == pytest.approx(expected, abs=1e-12)


def test_vqa_leave_one_out_values():
    assert vqa_accuracy("dog", _answers("dog", 2)) == pytest.approx(0.6)
    assert vqa_accuracy("dog", _answers("dog", 3)) == pytest.approx(0.9)
    assert vqa_accuracy("dog", _answers("dog", 4)) == 1.0


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("two", _answers("2", 3), 0.9),  # number word in the prediction
        ("2", _answers("two", 3), 0.9),  # and in the answers
        ("a dog", _answers("dog", 3), 0.9),
        ("dog", _answers("the dog", 3), 0.9),
        ("dont", _answers("don't", 4, other="no"), 1.0),
        ("don't", _answers("dont", 4, other="no"), 1.0),
        ("1000", _answers("1,000", 3, other="many"), 0.9),  # digit-comma-digit: comma deleted
        ("1,000", _answers("1,000", 3, other="many"), 0.9),
        ("3.5", _answers("3.5", 4, other="3"), 1.0),  # the period between digits stays
        ("35", _answers("3.5", 4, other="3"), 0.0),
        ("3", _answers("3.5", 4, other="3"), 1.0),
        ("Yes.", ["yes"] * 10, 1.0),
        ("  Dog\n", _answers("dog", 3), 0.9),
        ("dog", _answers("\tdog \n", 3), 0.9),  # answers are stripped too
    ],
)
def test_vqa_normalisation_cases(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, answers",
    [
        # Contractions, with and without the apostrophe, on either side.
        ("dont", ["dont"] * 10),
        ("don't", ["dont"] * 10),
        ("isnt", ["isn't"] * 10),
        ("isn't", ["isnt"] * 10),
        ("youre", ["youre"] * 10),
        ("You're", ["youre"] * 10),
        # Identical answers are normalised like any others.
        ("two", ["two"] * 10),
        ("dog", ["Dog"] * 10),
        ("dog", ["the dog."] * 10),
        # "'s" is not split off the prediction's word.
        ("dog's", ["dog's"] * 10),
        ("dog's", ["dog's"] * 5 + ["dog"] * 5),
    ],
)
def test_vqa_answers_always_normalised(prediction, answers):
    assert vqa_accuracy(prediction, answers) == 1.0


def test_vqa_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("dog", [])


# ------------------------------------------------------------------------------------------------ POPE


def test_pope_hand_computed():
    predictions = ["yes", "Yes.", "no", " NO ", "yes", "yes"]
    targets = ["yes", "yes", "no", "no", "no", "No"]
    # correct: 1 0 1 1 0 0 ; TP=1 (idx 0), FP=2 (idx 4, 5), FN=0 ("Yes." is neither yes nor no)
    assert pope_metrics(predictions, targets) == pytest.approx(
        {"accuracy": 3 / 6, "precision": 1 / 3, "recall": 1.0, "f1": 2 * (1 / 3) / (4 / 3), "yes_ratio": 2 / 6}
    )


def test_pope_yes_with_period_is_wrong():
    assert pope_metrics(["Yes."], ["yes"])["accuracy"] == 0.0
    assert pope_metrics([" Yes\n"], ["yes"])["accuracy"] == 1.0


def test_pope_yes_ratio_counts_ground_truth():
    # The model says "yes" every time; yes_ratio still reports the share of yes questions.
    assert pope_metrics(["yes"] * 4, ["yes", "no", "no", "no"])["yes_ratio"] == 0.25
    assert pope_metrics(["no"] * 4, ["yes", "yes", "yes", "no"])["yes_ratio"] == 0.75


def test_pope_recall_with_false_negatives():
    assert pope_metrics(["no", "yes"], ["yes", "yes"]) == pytest.approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 1.0}
    )


def test_pope_zero_divisions_give_zero():
    # Never predicts yes: precision 0/0 -> 0, recall 0/1 = 0, F1 with P + R = 0 -> 0.
    assert pope_metrics(["no", "no"], ["yes", "no"]) == {
        "accuracy": 0.5,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.5,
    }
    # No yes questions: recall 0/0 -> 0 even though every answer is right.
    assert pope_metrics(["no", "no"], ["no", "no"]) == {
        "accuracy": 1.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }


def test_pope_rejects_bad_input():
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="one prediction per target"):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="at least one"):
        pope_metrics([], [])


# ------------------------------------------------------------------------------------------------ MME


@pytest.mark.parametrize(
    "prediction, label",
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        (" NO ", "no"),
        ("Y", "yes"),
        ("n", "no"),
        ("x", "other"),
        ("", "other"),
        ("Yes, there is a dog.", "yes"),
        ("No, there isn't.", "no"),
        ("not sure", "no"),  # "no" within the first four characters
        ("none", "no"),
        ("I think yes", "other"),
        ("There is no dog", "other"),
    ],
)
def test_parse_mme_prediction(prediction, label):
    assert parse_mme_prediction(prediction) == label


def _pair(image, category, answers, predictions):
    return [
        {"question_id": image, "category": category, "prediction": p, "answer": a}
        for a, p in zip(answers, predictions)
    ]


def test_mme_scores_hand_computed():
    records = (
        _pair("e1.png", "existence", ["Yes", "No"], ["Yes", "No"])  # both right
        + _pair("e2.png", "existence", ["Yes", "No"], ["Yes", "Yes"])  # one right
        + _pair("c1.png", "count", ["No", "Yes"], ["no.", "Yes, two."])  # both right
        + _pair("r1.png", "code_reasoning", ["Yes", "No"], ["No", "No"])  # one right
        + _pair("r2.png", "code_reasoning", ["Yes", "No"], ["maybe", "Yes"])  # none right
    )
    result = mme_scores(records)
    assert result["categories"] == {
        "existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0},
        "count": {"acc": 100.0, "acc_plus": 100.0, "score": 200.0},
        "code_reasoning": {"acc": 25.0, "acc_plus": 0.0, "score": 25.0},
    }
    assert result["perception"] == 325.0
    assert result["cognition"] == 25.0


def test_mme_needs_exactly_two_questions_per_image():
    three = _pair("img7.png", "color", ["Yes", "No", "No"], ["Yes", "No", "No"])
    with pytest.raises(ValueError, match="img7.png"):
        mme_scores(three)
    one = _pair("img8.png", "color", ["Yes"], ["Yes"])
    with pytest.raises(ValueError, match="img8.png"):
        mme_scores(one)


def test_mme_pairs_are_per_category_and_unknown_categories_count_as_cognition():
    records = _pair("same.png", "scene", ["Yes", "No"], ["Yes", "No"]) + _pair(
        "same.png", "my_category", ["Yes", "No"], ["Yes", "No"]
    )
    result = mme_scores(records)
    assert result["perception"] == 200.0
    assert result["cognition"] == 200.0


def test_mme_category_lists_and_empty_input():
    assert len(MME_PERCEPTION_CATEGORIES) == 10 and "OCR" in MME_PERCEPTION_CATEGORIES
    assert len(MME_COGNITION_CATEGORIES) == 4
    assert not set(MME_PERCEPTION_CATEGORIES) & set(MME_COGNITION_CATEGORIES)
    assert mme_scores([]) == {"perception": 0.0, "cognition": 0.0, "categories": {}}


def test_mme_rejects_non_yes_no_answers():
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        mme_scores(_pair("img.png", "color", ["Red", "No"], ["Yes", "No"]))


# ------------------------------------------------------------------------------------------------ ScienceQA-IMG


@pytest.mark.parametrize(
    "prediction, target, expected",
    [
        ("A", "A", 1.0),
        (" A\n", "A", 1.0),  # the harness strips the generation
        ("A.", "A", 1.0),
        ("A. a magnet", "A", 1.0),
        ("B. a magnet", "A", 0.0),
        ("B", "A", 0.0),
        ("a", "A", 1.0),  # a bare letter is compared ignoring case
        ("b", "A", 0.0),
        ("a.", "A", 0.0),  # the "X." form needs an upper-case letter
        ("(A)", "A", 0.0),
        ("A)", "A", 0.0),
        ("AB", "A", 0.0),
        ("The answer is A.", "A", 0.0),
        ("", "A", 0.0),
    ],
)
def test_scienceqa_match(prediction, target, expected):
    assert scienceqa_match(prediction, target) == expected


def test_docstring_examples():
    class FencedParser(doctest.DocTestParser):
        """Ignore the ```python fences around HF-style examples."""

        def parse(self, string, name="<string>"):
            return super().parse(re.sub(r"(?m)^[ \t]*```.*$", "", string), name)

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(parser=FencedParser()).find(metrics):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0
