"""Scoring rules of lmms-eval's GQA, VQAv2, POPE, MME and ScienceQA-IMG tasks, without lmms-eval.

Each function reproduces what lmms-eval computes for one task, quirks included, so that numbers produced by the
built-in evaluator can be compared with published lmms-eval numbers. The docstrings name the lmms-eval code each rule
comes from and the places where that code does something a one-line summary would not predict.

lmms-eval's harness strips leading and trailing whitespace from every `generate_until` output before any metric or
`process_results` sees it (`ConfigurableTask.process_results` in `lmms_eval/api/task.py`). Every function here does
the same to the prediction, so raw generations can be passed in. Targets are used as the dataset stores them, as in
lmms-eval.
"""

from __future__ import annotations

import re
import statistics
import string

__all__ = [
    "MME_COGNITION_CATEGORIES",
    "MME_PERCEPTION_CATEGORIES",
    "exact_match",
    "mme_scores",
    "normalize_vqa_answer",
    "parse_mme_prediction",
    "pope_metrics",
    "scienceqa_match",
    "vqa_accuracy",
]

# ---------------------------------------------------------------------------------------------------------------
# GQA


_ALL_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _numpy_lower(text: str) -> str:
    """`str.lower` as `np.char.lower` applies it to a one-string array: the result keeps the input's width."""
    # A character whose lower-case form is longer ("İ" -> "i" + combining dot) is cut to the array's width, the
    # length of the input string, so "İ" lower-cases to "i" but "İ\x00" (one more slot) to "i̇".
    return text.rstrip("\0").lower()[: len(text)]


def exact_match(prediction: str, target: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """GQA accuracy of one prediction: 1.0 if it equals the target after the optional normalisations, else 0.0.

    Reproduces lmms-eval's registered `exact_match` metric (`exact_match_hf_evaluate` in `lmms_eval/api/metrics.py`,
    a port of Hugging Face `evaluate`'s exact_match) as configured by `lmms_eval/tasks/gqa/gqa.yaml`
    (`ignore_case: true`, `ignore_punctuation: true`):

    - the prediction is stripped of surrounding whitespace (done by lmms-eval's harness, not by the metric); the
      target is not, so a target `"yes "` never matches;
    - `ignore_case` lower-cases both strings;
    - `ignore_punctuation` deletes every character of `string.punctuation` from both (deleted, not replaced by a
      space, so `"t-shirt"` equals `"tshirt"`);
    - nothing else: inner whitespace is kept (`"yes ."` becomes `"yes "`) and number words are not mapped to digits.

    The metric runs on NumPy string arrays, and this function keeps their two quirks: trailing NUL characters are
    ignored (`"yes\\x00"` equals `"yes"`), and lower-casing cannot lengthen a string (see `_numpy_lower`).

    Args:
        prediction (`str`):
            The generated answer.
        target (`str`):
            The reference answer.
        ignore_case (`bool`, *optional*, defaults to `True`):
            Compare lower-cased strings.
        ignore_punctuation (`bool`, *optional*, defaults to `True`):
            Delete ASCII punctuation before comparing.

    Returns:
        `float`: 1.0 or 0.0.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.metrics import exact_match
    >>> exact_match(" Yes.\\n", "yes"), exact_match("Yes.", "yes", ignore_case=False), exact_match("yes", " yes")
    (1.0, 0.0, 0.0)
    ```
    """
    prediction = prediction.strip()
    if ignore_case:
        prediction, target = _numpy_lower(prediction), _numpy_lower(target)
    if ignore_punctuation:
        prediction, target = prediction.translate(_ALL_PUNCTUATION), target.translate(_ALL_PUNCTUATION)
    # NumPy string arrays drop trailing NULs, also those that deleted punctuation leaves at the end.
    return float(prediction.rstrip("\0") == target.rstrip("\0"))


# ---------------------------------------------------------------------------------------------------------------
# VQAv2: EvalAI answer normalisation (`process_punctuation` and `process_digit_article` of `EvalAIAnswerProcessor` in
# lmms_eval/tasks/_task_utils/vqa_eval_metric.py, itself from the official VQA evaluation code) and the leave-one-out
# accuracy of lmms_eval/tasks/vqav2/utils.py.

# The official table, kept verbatim: the capitalised keys can never match (words are lower-cased first) and
# "somebody'd" maps the wrong way round; both are part of the reference behaviour.
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophes, periods, colons and a few others are deliberately absent, as in the official list.
_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,+\d")
# The reference pattern is `(?!<=\d)(\.)(?!\d)`; its first group is a lookahead for the literal "<=" and never
# fires, so a period is removed exactly when no digit follows it ("3.5" keeps its period, "3." loses it).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The reference passes `re.UNICODE` (== 32) positionally to `Pattern.sub`, where it lands on `count`.
_PERIOD_STRIP_COUNT = 32


def _vqa_process_punctuation(text: str) -> str:
    """EvalAI `process_punctuation`: delete or space out punctuation, then drop periods not followed by a digit."""
    # The tests look at the input text, not at the text being rewritten: a digit-comma-digit anywhere ("1,000")
    # makes every punctuation mark disappear instead of turning into a space.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or has_digit_comma else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def _vqa_process_digit_article(text: str) -> str:
    """EvalAI `process_digit_article`: lower-case, number words to digits, drop articles, expand contractions."""
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """Normalise a VQAv2 answer, generated or human, as lmms-eval's `vqav2_process_results` does.

    Steps, in order (`lmms_eval/tasks/vqav2/utils.py` with the `EvalAIAnswerProcessor` methods of
    `lmms_eval/tasks/_task_utils/vqa_eval_metric.py`):

    1. turn newlines and tabs into spaces; strip;
    2. punctuation (`process_punctuation`): each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if it
       touches a space in the text or if the text contains a digit-comma-digit, and is replaced by a space
       otherwise; then every period not followed by a digit is deleted (at most 32 of them, see
       `_PERIOD_STRIP_COUNT`);
    3. `process_digit_article`: lower-case, split on whitespace, map `none`/`zero`..`ten` to digits, drop
       `a`/`an`/`the`, expand contractions from the official table (`"dont"` to `"don't"`), join with single spaces.

    The processor's full `__call__` (lower-case first, delete commas and question marks, split `"'s"` off its word)
    is not used by lmms-eval's VQAv2 task, so `"dog's"` stays `"dog's"` and `"red,blue"` becomes `"red blue"`.

    Args:
        text (`str`):
            An answer.

    Returns:
        `str`: the normalised answer.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.metrics import normalize_vqa_answer
    >>> normalize_vqa_answer("Two dogs."), normalize_vqa_answer("1,000"), normalize_vqa_answer("Isnt it?")
    ('2 dogs', '1000', "isn't it")
    ```
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (usually 10).

    Reproduces `vqav2_process_results` in `lmms_eval/tasks/vqav2/utils.py`:

    - the prediction (stripped by the harness) and every answer go through `normalize_vqa_answer`, always: unlike
      the official VQA evaluation code, lmms-eval normalises the answers even when they are all identical;
    - for each answer i, acc_i = min(1, #(other answers equal to the prediction) / 3); the result is the mean of
      the acc_i. lmms-eval leaves answer i out by comparing answer dicts, which VQAv2's `answer_id` makes unique, so
      leaving out by position is the same rule (answer dicts without an id would leave out every equal answer).

    Args:
        prediction (`str`):
            The generated answer.
        answers (`list[str]`):
            The human answers, duplicates included.

    Returns:
        `float`: the accuracy in [0, 1]; with 10 answers, k matches give 0, 0.3, 0.6, 0.9 for k = 0..3 and 1.0 from
        k = 4.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.metrics import vqa_accuracy
    >>> round(vqa_accuracy("Two", ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]), 6)
    0.6
    ```
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer, got an empty list")
    pred = normalize_vqa_answer(prediction.strip())
    refs = [normalize_vqa_answer(answer) for answer in answers]
    per_answer = []
    for left_out in range(len(refs)):
        matches = sum(1 for i, ref in enumerate(refs) if i != left_out and ref == pred)
        per_answer.append(min(1.0, matches / 3))
    # statistics.mean, as lmms-eval: it sums exactly, so the last bit matches theirs.
    return float(statistics.mean(per_answer))


# ---------------------------------------------------------------------------------------------------------------
# POPE


def pope_metrics(predictions: list[str], targets: list[str]) -> dict:
    """POPE accuracy, precision, recall, F1 and yes-ratio over a set of yes/no questions; "yes" is the positive class.

    Reproduces `pope_process_results` and the `pope_aggregate_*` functions of `lmms_eval/tasks/pope/utils.py`:

    - a prediction is lower-cased and stripped and must then *equal* `"yes"` or `"no"`; anything else (`"Yes."`,
      `"yes, there is"`) is wrong for accuracy and is neither a positive nor a negative prediction;
    - precision = TP / (TP + FP) with TP = (truth yes, prediction `"yes"`) and FP = (truth no, prediction `"yes"`);
    - recall = TP / (TP + FN) where FN counts only predictions equal to `"no"` on yes-questions: an unparseable
      prediction on a yes-question is left out of recall entirely, as in lmms-eval;
    - F1 = 2PR / (P + R);
    - `yes_ratio` is the share of *ground-truth* answers that are yes (a property of the data, not of the model);
    - a zero denominator gives 0.0, as lmms-eval's `... if denominator > 0 else 0`.

    Args:
        predictions (`list[str]`):
            Generated answers.
        targets (`list[str]`):
            Ground-truth answers, each `"yes"` or `"no"` (case and surrounding whitespace ignored).

    Returns:
        `dict`: `accuracy`, `precision`, `recall`, `f1` and `yes_ratio`, each a float in [0, 1].

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.metrics import pope_metrics
    >>> pope_metrics(["yes", "Yes.", "no", "no"], ["yes", "yes", "no", "yes"])
    {'accuracy': 0.5, 'precision': 1.0, 'recall': 0.5, 'f1': 0.6666666666666666, 'yes_ratio': 0.75}
    ```
    """
    if len(predictions) != len(targets):
        raise ValueError(
            f"pope_metrics needs one prediction per target, got {len(predictions)} predictions and {len(targets)} targets"
        )
    if not targets:
        raise ValueError("pope_metrics needs at least one question, got empty lists")
    preds = [prediction.lower().strip() for prediction in predictions]
    truths = [target.lower().strip() for target in targets]
    for index, truth in enumerate(truths):
        if truth not in ("yes", "no"):
            raise ValueError(f"POPE targets must be 'yes' or 'no', got {targets[index]!r} at index {index}")

    pairs = list(zip(truths, preds))
    true_pos = sum(1 for truth, pred in pairs if truth == "yes" and pred == "yes")
    false_pos = sum(1 for truth, pred in pairs if truth == "no" and pred == "yes")
    false_neg = sum(1 for truth, pred in pairs if truth == "yes" and pred == "no")

    accuracy = sum(1.0 if pred == truth else 0.0 for truth, pred in pairs) / len(pairs)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos > 0 else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    yes_ratio = truths.count("yes") / len(truths)
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}


# ---------------------------------------------------------------------------------------------------------------
# MME

# `eval_type_dict` of lmms_eval/tasks/mme/utils.py.
MME_PERCEPTION_CATEGORIES = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION_CATEGORIES = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_prediction(prediction: str) -> str:
    """Map a generated MME answer to `"yes"`, `"no"` or `"other"`, as lmms-eval's `parse_pred_ans` (from Otter).

    After stripping, lower-casing and deleting every period: `"yes"`/`"no"` as is; a single character `"y"`/`"n"`
    means yes/no (any other single character is other); otherwise the first four characters decide, `"yes"`
    anywhere in them winning over `"no"` anywhere in them. So `"Yes, there is"` is yes; `"not sure"` and `"none"`
    are no (their first four characters contain "no"); `"I think yes"` and `"There is no dog"` are other.

    Args:
        prediction (`str`):
            The generated answer.

    Returns:
        `str`: `"yes"`, `"no"` or `"other"`.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.metrics import parse_mme_prediction
    >>> [parse_mme_prediction(p) for p in ["Yes.", "N", "not sure", "I think yes"]]
    ['yes', 'no', 'no', 'other']
    ```
    """
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: list[dict]) -> dict:
    """MME per-category acc / acc+ / score and the perception and cognition totals.

    Reproduces `mme_process_results` and `mme_aggregate_results` of `lmms_eval/tasks/mme/utils.py`:

    - a question is correct when `parse_mme_prediction(prediction)` equals the answer (lower-cased, stripped,
      periods deleted; it must then be yes or no);
    - questions are grouped by category, then by `question_id`, which in MME names the image; every image must
      have exactly two questions (lmms-eval asserts it, here it is a `ValueError` naming the image);
    - per category, over its images: acc = mean of 100 * (share of the image's questions correct), acc+ = mean of
      100 * (both correct), score = acc + acc+ (so at most 200);
    - `perception` sums the scores of the categories in `MME_PERCEPTION_CATEGORIES`, `cognition` those of all
      other categories: lmms-eval sends every category that is not a perception category to the cognition score,
      so an unknown category lands there too.

    Args:
        records (`list[dict]`):
            One dict per question with keys `question_id` (the image), `category`, `prediction` and `answer`
            (`"yes"`/`"no"`).

    Returns:
        `dict`: `perception` and `cognition` (floats, 0.0 when no category of that kind is present) and
        `categories`, mapping each category to `{"acc", "acc_plus", "score"}` in percent.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.metrics import mme_scores
    >>> records = [
    ...     {"question_id": "img1", "category": "color", "prediction": "Yes", "answer": "Yes"},
    ...     {"question_id": "img1", "category": "color", "prediction": "Yes", "answer": "No"},
    ... ]
    >>> mme_scores(records)["categories"]["color"]
    {'acc': 50.0, 'acc_plus': 0.0, 'score': 50.0}
    ```
    """
    by_category: dict[str, dict[str, list[float]]] = {}
    for record in records:
        truth = record["answer"].lower().strip().replace(".", "")
        if truth not in ("yes", "no"):
            raise ValueError(
                f"MME answers must be 'yes' or 'no', got {record['answer']!r} for question_id {record['question_id']!r}"
            )
        score = 1.0 if parse_mme_prediction(record["prediction"]) == truth else 0.0
        by_category.setdefault(record["category"], {}).setdefault(record["question_id"], []).append(score)

    categories = {}
    for category, by_image in by_category.items():
        acc_total = plus_total = score_total = 0.0
        for question_id, scores in by_image.items():
            if len(scores) != 2:
                raise ValueError(
                    f"MME scores questions in pairs, but question_id {question_id!r} (category {category!r}) has "
                    f"{len(scores)} question(s); every image needs exactly 2"
                )
            acc = sum(scores) / len(scores) * 100.0
            acc_plus = (sum(scores) == 2) * 100.0
            acc_total += acc
            plus_total += acc_plus
            score_total += acc_plus + acc
        num_images = len(by_image)
        categories[category] = {
            "acc": acc_total / num_images,
            "acc_plus": plus_total / num_images,
            "score": score_total / num_images,
        }

    perception = sum(v["score"] for c, v in categories.items() if c in MME_PERCEPTION_CATEGORIES)
    cognition = sum(v["score"] for c, v in categories.items() if c not in MME_PERCEPTION_CATEGORIES)
    return {"perception": float(perception), "cognition": float(cognition), "categories": categories}


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG


def scienceqa_match(prediction: str, target_letter: str) -> float:
    """ScienceQA-IMG accuracy of one prediction: 1.0 if it names the target option letter, else 0.0.

    Reproduces `sqa_process_results` of `lmms_eval/tasks/scienceqa/utils.py` ("how llava parses it"), after the
    harness's whitespace strip. The prediction is right if it equals the letter ignoring case (`"A"`, `"a"`), or if it
    starts with an upper-case character followed by a period (`"A."`, `"A. cat"`) and that character is the letter.
    Nothing else is parsed: `"(A)"`, `"A)"`, `"a."` and `"The answer is A"` all score 0. The
    `ignore_case`/`ignore_punctuation` flags in `scienceqa_img.yaml` have no effect there, because the task's
    own `process_results` returns the score.

    Args:
        prediction (`str`):
            The generated answer.
        target_letter (`str`):
            The correct option letter, e.g. `"A"`.

    Returns:
        `float`: 1.0 or 0.0.

    Example:

    ```python
    >>> from hf_sparse_mllm.evaluation.metrics import scienceqa_match
    >>> scienceqa_match("B. a magnet", "B"), scienceqa_match("(B)", "B")
    (1.0, 0.0)
    ```
    """
    target = target_letter.strip().lower()
    pred = prediction.strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target)
    return 0.0
