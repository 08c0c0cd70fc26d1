"""Every metric of `hf_sparse_mllm.evaluation.metrics` gives lmms-eval 0.7.3's value on thousands of generated inputs.

Slow: installs lmms-eval (`lmms_eval_install`) and scores the inputs with lmms-eval's own task code in a subprocess
(`lmms_eval_reference_scores.py`). A seeded generator builds the inputs from pieces that follow the rules the metrics
normalise: whitespace, punctuation, case, articles, number words, contractions, option letters and yes/no answers.
Each case draws *what* it is about (a contraction, a number, an answer) once and renders it independently on the
prediction's and on the target's side, so that matches and near misses are both common.
"""

from __future__ import annotations

import importlib.util
import json
import random
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from lmms_eval_install import install_lmms_eval, lmms_eval_env

from hf_sparse_mllm.evaluation import metrics

pytestmark = pytest.mark.slow

RULES = ("whitespace", "punctuation", "case", "articles", "number_words", "contractions", "option_letters", "yes_no")
TEXT_RULES = RULES[:6]

WHITESPACE = (" ", "  ", "\t", "\n", "\r\n", " \t\n", "\x0b", "\x0c", "\u00a0")
PERIOD_NUMBERS = ("2.5", "3.", ".5", "0.25", "1.000", "3.14.15", "1,000", "1,000.5", "10:30", "a.b", "e.g.")
CASES = {
    "upper": str.upper,
    "lower": str.lower,
    "title": str.title,
    "swapcase": str.swapcase,
    "capitalize": str.capitalize,
}
ARTICLES = ("a", "an", "the")
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
NUMBER_EXTRAS = ("eleven", "11", "twenty", "2nd", "1st")
# Common contractions, besides lmms-eval's own table (the EvalAI list, see `evalai_contractions`).
COMMON_CONTRACTIONS = (
    "don't", "isn't", "you're", "it's", "can't", "won't", "i'm", "i've", "they're", "we'll", "she's", "he'd", "let's",
    "o'clock", "ma'am", "y'all", "wouldn't've", "what's", "that's", "there's", "aren't", "doesn't", "didn't",
    "haven't", "couldn't", "shouldn't", "wasn't", "weren't", "who's", "'twas", "ain't", "how'd", "it'll", "you'd",
)  # fmt: skip
WORDS = (
    "yes", "no", "left", "right", "red", "black and white", "t-shirt", "man", "table", "dog's", "on the left", "2",
    "10:30", "1,000", "2.5", "3", "İstanbul", "ΑΣ", "straße", "wooden chair", "he is", "don't know", "none",
)  # fmt: skip
YES_ANSWERS = ("yes", "Yes", "YES", "y", "Y", "yes.", "Yes,", "Yes.", "Yes, there is a dog.", "yeah", "yes yes", "Y.")
NO_ANSWERS = (
    "no", "No", "NO", "n", "N", "No.", "no!", "No, there is not.", "not sure", "none", "nope", "n.", "No yes",
)  # fmt: skip
OTHER_ANSWERS = ("", ".", "I think yes", "There is no dog", "no\nyes", "yes.no", "maybe", "x", "yesno", "ye s")
YES_NO = YES_ANSWERS + NO_ANSWERS + OTHER_ANSWERS
OPTION_FORMATS = (
    "{L}", "{l}", "({L})", "({l})", "{L}.", "{l}.", "{L}. {text}", "{l}. {text}", "{L}) {text}", "{L}: {text}",
    "[{L}]", "{L},", "The answer is {L}", "The answer is {L}.", "Answer: {L}", "{L}{L}", "{text}", "Option {L}",
    "{L} {text}", "{L}.{text}",
)  # fmt: skip
PERCEPTION, COGNITION = metrics.MME_PERCEPTION_CATEGORIES, metrics.MME_COGNITION_CATEGORIES

NUM_GQA, NUM_VQA, NUM_SQA, NUM_POPE_GROUPS, NUM_MME_GROUPS = 4000, 3000, 2000, 300, 300


def vqa_doc(question_id: int, answers: list[str]) -> dict:
    """A VQAv2 doc as lmms-lab's dataset stores it: `answer_id` makes every answer dict unique."""
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]
    return {"question": "q", "question_id": question_id, "answers": answers}


class Generator:
    """Seeded inputs; `used[rule]` records which piece of each rule was drawn, to check the coverage."""

    def __init__(self, seed: int, contractions: dict[str, str]):
        self.rng = random.Random(seed)
        self.contraction_table = contractions
        self.contraction_words = sorted(set(COMMON_CONTRACTIONS) | set(contractions) | set(contractions.values()))
        self.used: dict[str, Counter] = {rule: Counter() for rule in RULES}

    # Each piece takes `what` (a Random shared by both sides of a case) and renders it with `self.rng`.

    def whitespace(self, what: random.Random, text: str) -> str:
        rng = self.rng
        where = rng.choice(("before", "after", "around", "inner", "nul"))
        self.used["whitespace"][where] += 1
        if where == "nul":  # NumPy strings, which lmms-eval's exact_match uses, drop trailing NULs like padding
            return text + "\0" * rng.randint(1, 2)
        pieces = [rng.choice(WHITESPACE) for _ in range(rng.randint(1, 3))]
        self.used["whitespace"].update(pieces)
        gap = "".join(pieces)
        if where == "before":
            return gap + text
        if where == "after":
            return text + gap
        if where == "around":
            return gap + text + rng.choice(WHITESPACE)
        if " " in text:
            return text.replace(" ", gap, 1)
        cut = rng.randint(0, len(text))
        return text[:cut] + gap + text[cut:]

    def punctuation(self, what: random.Random, text: str) -> str:
        rng = self.rng
        mark = rng.choice(string.punctuation)
        where = rng.choice(("start", "end", "middle", "spaced", "number"))
        self.used["punctuation"].update([mark, where])
        if where == "start":
            return mark + text
        if where == "end":
            return text + mark
        if where == "middle":
            cut = rng.randint(1, max(1, len(text) - 1))
            return text[:cut] + mark + text[cut:]
        if where == "spaced":
            return rng.choice((f"{text} {mark}", f"{mark} {text}", f"{text} {mark} {text}"))
        number = what.choice(PERIOD_NUMBERS)
        self.used["punctuation"][number] += 1
        return rng.choice((number, f"{text} {number}", number.replace(".", "", rng.randint(0, 1))))

    def case(self, what: random.Random, text: str) -> str:
        name = self.rng.choice((*CASES, "random"))
        self.used["case"][name] += 1
        if name == "random":
            return "".join(c.upper() if self.rng.random() < 0.5 else c.lower() for c in text)
        return CASES[name](text)

    def articles(self, what: random.Random, text: str) -> str:
        article = what.choice(ARTICLES)
        if self.rng.random() < 0.3:  # the other side may leave the article out
            return text
        self.used["articles"][article] += 1
        article = self.rng.choice((article, article.capitalize(), article.upper()))
        where = what.choice(("prefix", "inner", "alone", "glued"))
        self.used["articles"][where] += 1
        if where == "prefix":
            return f"{article} {text}"
        if where == "inner":
            words = text.split(" ")
            words.insert(what.randint(0, len(words)), article)
            return " ".join(words)
        if where == "alone":
            return article
        return article + text

    def number_words(self, what: random.Random, text: str) -> str:
        if what.random() < 0.15:
            number = word = what.choice(NUMBER_EXTRAS)
        else:
            word = what.choice(list(NUMBER_WORDS))
            number = self.rng.choice((word, NUMBER_WORDS[word], word.capitalize()))
        self.used["number_words"][word] += 1
        where = what.choice(("alone", "before", "after"))
        return {"alone": number, "before": f"{number} {text}", "after": f"{text} {number}"}[where]

    def contractions(self, what: random.Random, text: str) -> str:
        word = what.choice(self.contraction_words)
        form = self.rng.choice(("as is", "no apostrophe", "apostrophe", "capitalized"))
        self.used["contractions"][word] += 1
        self.used["contractions"][form] += 1
        if form == "no apostrophe":
            word = word.replace("'", "")
        elif form == "apostrophe":
            word = self.contraction_table.get(word, word)
        elif form == "capitalized":
            word = word.capitalize()
        where = what.choice(("alone", "before", "after"))
        return {"alone": word, "before": f"{word} {text}", "after": f"{text} {word}"}[where]

    def render(self, text: str, rules: list[str], shared: list[int], p: float = 1.0) -> str:
        """Apply each rule (in the given order) with probability `p`, its *what* drawn from `shared`."""
        for rule, seed in zip(rules, shared):
            if self.rng.random() < p:
                text = getattr(self, rule)(random.Random(seed), text)
        return text

    def draw_rules(self, pool=TEXT_RULES) -> tuple[list[str], list[int]]:
        rules = self.rng.sample(pool, self.rng.randint(1, 3))
        return rules, [self.rng.getrandbits(32) for _ in rules]

    # ------------------------------------------------------------------------------------------------ cases

    def gqa_case(self) -> dict:
        base = self.rng.choice(WORDS + YES_NO)
        rules, shared = self.draw_rules()
        target = self.render(base, rules, shared, p=0.4)
        prediction = self.render(base, rules, shared)
        return {"rules": rules, "doc": {"question": "q", "answer": target}, "prediction": prediction}

    def vqa_case(self, question_id: int) -> dict:
        rng = self.rng
        base, other = rng.choice(WORDS), rng.choice(WORDS + YES_NO)
        rules, shared = self.draw_rules()
        if rng.random() < 0.2:  # ten identical answers
            answers = [self.render(base, rules, shared, p=0.5)] * 10
        else:
            matching = rng.randint(0, 10)
            answers = [self.render(base, rules, shared, p=0.5) for _ in range(matching)]
            answers += [self.render(other, rules, shared, p=0.5) for _ in range(10 - matching)]
            rng.shuffle(answers)
        return {"rules": rules, "doc": vqa_doc(question_id, answers), "prediction": self.render(base, rules, shared)}

    def contraction_vqa_cases(self, word: str, first_id: int) -> list[dict]:
        """`word` without its apostrophes against `word` with them, both ways, and capitalised against as is."""
        bare, full = word.replace("'", ""), self.contraction_table.get(word, word)
        cases = []
        for index, (prediction, answer) in enumerate(((bare, full), (full, bare), (word.capitalize(), word))):
            self.used["contractions"][word] += 1
            matching = self.rng.randint(1, 10)
            answers = [answer] * matching + ["cat"] * (10 - matching)
            cases.append(
                {"rules": ["contractions"], "doc": vqa_doc(first_id + index, answers), "prediction": prediction}
            )
        return cases

    def sqa_case(self) -> dict:
        rng = self.rng
        choices = rng.sample(("cat", "magnet", "yes", "the sun", "two", "Africa", "B", "none"), rng.randint(2, 5))
        answer = rng.randrange(len(choices))
        letter = chr(ord("A") + answer) if rng.random() < 0.6 else rng.choice("ABCDEÄ")
        template = rng.choice(OPTION_FORMATS)
        self.used["option_letters"][template] += 1
        prediction = template.format(L=letter, l=letter.lower(), text=rng.choice(choices))
        rules, shared = self.draw_rules(("whitespace", "case", "punctuation"))
        prediction = self.render(prediction, rules, shared, p=0.5)
        doc = {"question": "q", "hint": "", "choices": choices, "answer": answer}
        return {"rules": ["option_letters", *rules], "doc": doc, "prediction": prediction}

    def yes_no_prediction(self, truth: str) -> tuple[str, list[str]]:
        rng = self.rng
        if rng.random() < 0.5:
            prediction = rng.choice(YES_ANSWERS if truth == "yes" else NO_ANSWERS)
        else:
            prediction = rng.choice(YES_NO)
        self.used["yes_no"][prediction] += 1
        rules, shared = self.draw_rules(("whitespace", "case", "punctuation"))
        return self.render(prediction, rules, shared, p=0.5), ["yes_no", *rules]

    def truth_text(self, truth: str, capitalize: bool = False) -> str:
        forms = (truth, truth.upper(), f" {truth} ", f"{truth}\n", truth.capitalize())
        return truth.capitalize() if capitalize and self.rng.random() < 0.5 else self.rng.choice(forms)

    def pope_group(self) -> list[dict]:
        group = []
        for index in range(self.rng.randint(1, 10)):
            truth = self.rng.choice(("yes", "no"))
            prediction, rules = self.yes_no_prediction(truth)
            doc = {"question": "q", "answer": self.truth_text(truth), "question_id": str(index)}
            group.append({"rules": rules, "doc": doc, "prediction": prediction})
        return group

    def mme_group(self) -> list[dict]:
        rng = self.rng
        group = []
        for category in rng.sample((*PERCEPTION, *COGNITION, "my_category"), rng.randint(1, 3)):
            for image in range(rng.randint(1, 3)):
                for truth in rng.choice((("yes", "no"), ("no", "yes"), ("yes", "yes"), ("no", "no"))):
                    prediction, rules = self.yes_no_prediction(truth)
                    answer = self.truth_text(truth, capitalize=True)
                    if answer == answer.strip() and rng.random() < 0.3:
                        answer += "."  # lmms-eval deletes periods from MME answers after stripping them
                    doc = {"question": "q", "answer": answer, "question_id": f"img{image}.png", "category": category}
                    group.append({"rules": rules, "doc": doc, "prediction": prediction})
        rng.shuffle(group)
        return group


def evalai_contractions(lmms_eval_path: str) -> dict[str, str]:
    """lmms-eval's own contraction table, read from its module file (which imports nothing but `re`)."""
    path = Path(lmms_eval_path, "lmms_eval", "tasks", "_task_utils", "vqa_eval_metric.py")
    spec = importlib.util.spec_from_file_location("lmms_eval_vqa_eval_metric", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.EvalAIAnswerProcessor.CONTRACTIONS)


def generate(contractions: dict[str, str], seed: int = 0) -> tuple[dict, Generator]:
    gen = Generator(seed, contractions)
    words = gen.contraction_words
    cases = {
        "gqa": [gen.gqa_case() for _ in range(NUM_GQA)],
        # Every contraction in its forms, pairwise: a table entry only matters when the two sides differ.
        "vqav2": [gen.vqa_case(i) for i in range(NUM_VQA)]
        + [case for i, word in enumerate(words) for case in gen.contraction_vqa_cases(word, NUM_VQA + 3 * i)],
        "scienceqa": [gen.sqa_case() for _ in range(NUM_SQA)],
        "pope": [gen.pope_group() for _ in range(NUM_POPE_GROUPS)],
        "mme": [gen.mme_group() for _ in range(NUM_MME_GROUPS)],
    }
    return cases, gen


def ours(cases: dict) -> dict:
    pope_keys = {"accuracy": "pope_accuracy", "precision": "pope_precision", "recall": "pope_recall"}
    pope_keys |= {"f1": "pope_f1_score", "yes_ratio": "pope_yes_ratio"}
    out = {
        "gqa": [metrics.exact_match(c["prediction"], c["doc"]["answer"]) for c in cases["gqa"]],
        "vqav2": [
            metrics.vqa_accuracy(c["prediction"], [a["answer"] for a in c["doc"]["answers"]]) for c in cases["vqav2"]
        ],
        "scienceqa": [
            metrics.scienceqa_match(c["prediction"], chr(ord("A") + c["doc"]["answer"])) for c in cases["scienceqa"]
        ],
        "pope": [],
        "mme": [],
    }
    for group in cases["pope"]:
        predictions, truths = [c["prediction"] for c in group], [c["doc"]["answer"] for c in group]
        scores = [metrics.pope_metrics([p], [t])["accuracy"] for p, t in zip(predictions, truths)]
        values = metrics.pope_metrics(predictions, truths)
        out["pope"].append({"scores": scores, **{pope_keys[k]: v for k, v in values.items()}})
    for group in cases["mme"]:
        records = [{**c["doc"], "prediction": c["prediction"]} for c in group]
        values = metrics.mme_scores(records)
        labels = [metrics.parse_mme_prediction(c["prediction"]) for c in group]
        out["mme"].append(
            {
                "labels": labels,
                "mme_perception_score": values["perception"],
                "mme_cognition_score": values["cognition"],
            }
        )
    return out


def disagreements(cases: dict, our_values: dict, their_values: dict) -> list[str]:
    targets = {
        "gqa": lambda doc: doc["answer"],
        "vqav2": lambda doc: [a["answer"] for a in doc["answers"]],
        "scienceqa": lambda doc: f"{chr(ord('A') + doc['answer'])} of {doc['choices']}",
    }
    found = []
    for task, target in targets.items():
        for case, mine, theirs in zip(cases[task], our_values[task], their_values[task], strict=True):
            if mine != theirs:
                inputs = f"{case['prediction']!r} vs {target(case['doc'])!r}"
                found.append(f"{task} {case['rules']}: {inputs}: ours {mine}, lmms-eval {theirs}")
    for task in ("pope", "mme"):
        for group, mine, theirs in zip(cases[task], our_values[task], their_values[task], strict=True):
            for key, value in theirs.items():  # the harness aggregates only the metrics that some doc returned
                if mine[key] != value:
                    inputs = [(c["prediction"], c["doc"]["answer"]) for c in group]
                    found.append(f"{task} {key}: {inputs}: ours {mine[key]}, lmms-eval {value}")
    return found


@pytest.fixture(scope="module")
def lmms_eval_path(tmp_path_factory):
    return install_lmms_eval(tmp_path_factory.mktemp("lmms_eval_pkgs"))


@pytest.fixture(scope="module")
def generated(lmms_eval_path):
    return generate(evalai_contractions(lmms_eval_path))


def test_generator_covers_every_rule(generated):
    cases, gen = generated
    tags = Counter(rule for task in ("gqa", "vqav2", "scienceqa") for case in cases[task] for rule in case["rules"])
    tags.update(rule for task in ("pope", "mme") for group in cases[task] for case in group for rule in case["rules"])
    assert all(tags[rule] >= 500 for rule in RULES), tags
    used = gen.used
    assert set(string.punctuation) <= set(used["punctuation"]) and set(PERIOD_NUMBERS) <= set(used["punctuation"])
    assert {"start", "end", "middle", "spaced", "number"} <= set(used["punctuation"])
    assert set(WHITESPACE) | {"before", "after", "around", "inner", "nul"} <= set(used["whitespace"])
    assert set(CASES) | {"random"} <= set(used["case"])
    assert set(ARTICLES) | {"prefix", "inner", "alone", "glued"} <= set(used["articles"])
    assert set(NUMBER_WORDS) | set(NUMBER_EXTRAS) <= set(used["number_words"])
    assert len(gen.contraction_table) >= 100 and set(gen.contraction_table) <= set(used["contractions"])
    assert set(gen.contraction_words) | {"as is", "no apostrophe", "apostrophe", "capitalized"} <= set(
        used["contractions"]
    )
    assert set(OPTION_FORMATS) <= set(used["option_letters"])
    assert set(YES_NO) <= set(used["yes_no"])


def test_metrics_equal_lmms_eval(lmms_eval_path, generated, tmp_path):
    cases, _ = generated
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = Path(__file__).with_name("lmms_eval_reference_scores.py")
    run = subprocess.run(
        [sys.executable, str(script), "cases.json", "theirs.json"],
        cwd=tmp_path,
        env=lmms_eval_env(lmms_eval_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    theirs = json.loads((tmp_path / "theirs.json").read_text())
    mine = ours(cases)

    found = disagreements(cases, mine, theirs)
    assert not found, f"{len(found)} disagreements with lmms-eval, the first ones:\n" + "\n".join(found[:25])
    # The inputs are worth comparing: right and wrong answers (and VQA's partial credit) all occur.
    for task in ("gqa", "scienceqa"):
        assert 0.1 < sum(theirs[task]) / len(theirs[task]) < 0.9, task
    assert {0.0, 1.0} < set(theirs["vqav2"])
    assert 0 < sum(v["pope_accuracy"] for v in theirs["pope"]) / NUM_POPE_GROUPS < 1
    assert {"yes", "no", "other"} == {label for group in theirs["mme"] for label in group["labels"]}
