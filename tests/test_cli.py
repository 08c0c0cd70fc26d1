"""The `hf-sparse-mllm` command line: train on a local JSONL dataset, eval with the conversational task, YAML recipes,
errors that name the bad flag or value, help texts, and the evaluation and analysis commands."""

from __future__ import annotations

import dataclasses
import json
import runpy
import string
import sys
from importlib.metadata import EntryPoint

import pytest
import torch
from conftest import COLORS, WORDS
from PIL import Image
from test_evaluation import save_vqa, two_answer_model

from hf_sparse_mllm import SPARSE_CONFIG_NAME, SparseMLLMConfig
from hf_sparse_mllm.cli import eval as cli_eval
from hf_sparse_mllm.cli import main
from hf_sparse_mllm.cli import train as cli_train
from hf_sparse_mllm.cli.arguments import PACKAGE_FIELDS
from hf_sparse_mllm.evaluation import evaluate, get_task, tasks
from hf_sparse_mllm.evaluation.metrics import normalize_vqa_answer

# Compression, DualSpeed (seed 1: steps 0-2 hold fast and slow steps) and layer skipping, as flags.
SPARSE_FLAGS = [
    "--token_compressor", "divprune", "--keep_ratio", "0.25", "--slow_mode_prob", "0.5", "--sparse_seed", "1",
    "--layer_skip_policy", "fixed", "--skip_layers", "1", "--protect_layers", "0",
]  # fmt: skip
TRAIN_FLAGS = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "2",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
]


def write_conversational_jsonl(folder, n: int = 6) -> str:
    """`folder/train.jsonl` in the conversational format, its images PNG files under `folder/img/` given as paths
    relative to the JSONL file."""
    (folder / "img").mkdir(parents=True)
    with open(folder / "train.jsonl", "w") as handle:
        for i in range(n):
            colour = list(COLORS)[i % 3]
            Image.new("RGB", (32, 32), COLORS[colour]).save(folder / "img" / f"{i}.png")
            sample = {
                "images": [f"img/{i}.png"],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": colour}]},
                ],
            }
            handle.write(json.dumps(sample) + "\n")
    return str(folder / "train.jsonl")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from hf_sparse_mllm.tiny import build_tiny_llava_and_processor

    root = tmp_path_factory.mktemp("cli")
    model, processor = build_tiny_llava_and_processor("test", words=WORDS, seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root, str(root / "model"), write_conversational_jsonl(root / "data")


def train_argv(workspace, output_dir: str, *extra: str) -> list[str]:
    _, model_dir, data = workspace
    return ["--model_name_or_path", model_dir, "--dataset_name", data, "--output_dir", output_dir, *extra]


def final_loss(trainer) -> float:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]


@pytest.fixture(scope="module")
def trained(workspace):
    """One `hf-sparse-mllm train` run with every sparse component on, SFTConfig's other defaults unchanged."""
    root, _, _ = workspace
    output_dir = str(root / "trained")
    trainer = cli_train.train(*cli_train.parse_args(train_argv(workspace, output_dir, *TRAIN_FLAGS, *SPARSE_FLAGS)))
    return output_dir, trainer


# ---- train ---------------------------------------------------------------------------------------------------------


def test_train_saves_model_recipe_and_card(trained, workspace, capsys):
    from transformers import AutoModelForImageTextToText

    output_dir, trainer = trained
    assert trainer.args.gradient_checkpointing and not trainer.args.bf16  # TRL's default; no bf16 on this CPU
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert {entry["sparse/slow_step"] for entry in logs} == {0.0, 1.0}
    fast = [entry for entry in logs if entry["sparse/slow_step"] == 0]
    assert all(entry["sparse/visual_tokens_per_image"] == 4 and entry["sparse/skipped_layers"] == 1 for entry in fast)

    recipe = json.loads(open(f"{output_dir}/{SPARSE_CONFIG_NAME}").read())
    assert recipe["token_compressor"] == "divprune" and recipe["keep_ratio"] == 0.25 and recipe["seed"] == 1
    assert recipe["layer_skip_policy"] == "fixed" and recipe["skip_layers"] == [1]
    card = open(f"{output_dir}/README.md").read()
    assert "hf-sparse-mllm" in card and "`divprune` keeps 25 %" in card
    model = AutoModelForImageTextToText.from_pretrained(output_dir)  # the plain architecture, no isolator
    assert model.config.model_type == "llava" and not any("isolator" in name for name in model.state_dict())
    import transformers

    assert transformers.AutoProcessor.from_pretrained(output_dir).tokenizer.pad_token is not None


def test_train_prints_the_recipe(workspace, tmp_path, capsys):
    assert (
        main(["train", *train_argv(workspace, str(tmp_path / "out"), "--max_steps", "1", "--save_strategy", "no")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "Sparse training recipe (stage: instruction):" in printed
    assert "Visual token compression (fast steps): `divprune`" in printed and '"keep_ratio": 0.25' in printed
    assert (tmp_path / "out" / SPARSE_CONFIG_NAME).exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_yaml_recipe_gives_the_same_run_as_the_flags(trained, workspace, tmp_path):
    import yaml

    output_dir, flags_trainer = trained
    _, model_dir, data = workspace
    # YAML's own types (numbers, lists) and the string forms a command line gives, for the same values.
    recipe = {
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": str(tmp_path / "yaml"),
        "max_steps": 3,
        "per_device_train_batch_size": "2",
        "logging_steps": 1,
        "save_strategy": "no",
        "token_compressor": "divprune",
        "keep_ratio": "0.25",
        "slow_mode_prob": 0.5,
        "sparse_seed": 1,
        "layer_skip_policy": "fixed",
        "skip_layers": [1],
        "protect_layers": "0",
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    yaml_trainer = cli_train.train(*cli_train.parse_args(["--config", str(tmp_path / "recipe.yaml")]))
    assert (tmp_path / "yaml" / SPARSE_CONFIG_NAME).read_text() == open(f"{output_dir}/{SPARSE_CONFIG_NAME}").read()
    assert final_loss(yaml_trainer) == final_loss(flags_trainer)
    # A flag after --config wins over the file.
    *_, sparse_config = cli_train.parse_args(["--config", str(tmp_path / "recipe.yaml"), "--keep_ratio", "0.5"])
    assert sparse_config.keep_ratio == 0.5 and sparse_config.skip_layers == [1]


def test_simple_columns_are_mapped_to_the_conversational_format(workspace, tmp_path):
    from hf_sparse_mllm.data.conversational import load_conversational_dataset

    root, model_dir, _ = workspace
    with open(tmp_path / "qa.jsonl", "w") as handle:
        for i in range(4):
            handle.write(json.dumps({"image": str(root / "data" / "img" / f"{i}.png"), "question": "what color ?",
                                     "answer": list(COLORS)[i % 3]}) + "\n")  # fmt: skip
    data = load_conversational_dataset(str(tmp_path / "qa.jsonl"), dataset_format="simple")
    assert data[0]["images"][0].size == (32, 32)
    assert data[1]["messages"][1]["content"][0]["text"] == "green"
    trainer = cli_train.train(
        *cli_train.parse_args(
            [
                "--model_name_or_path",
                model_dir,
                "--dataset_name",
                str(tmp_path / "qa.jsonl"),
                "--dataset_format",
                "simple",
                "--output_dir",
                str(tmp_path / "out"),
                "--max_steps",
                "1",
                "--save_strategy",
                "no",
            ]
        )  # fmt: skip
    )
    assert trainer.state.global_step == 1
    with pytest.raises(ValueError, match="use dataset_format='simple'"):
        load_conversational_dataset(str(tmp_path / "qa.jsonl"))


def test_missing_image_files_are_named_before_training(workspace, tmp_path):
    from hf_sparse_mllm.data.conversational import load_conversational_dataset

    lines = open(workspace[2]).read().splitlines()
    broken = json.loads(lines[1])
    broken["images"] = ["img/missing.png"]
    (tmp_path / "img").symlink_to(workspace[0] / "data" / "img")
    (tmp_path / "train.jsonl").write_text("\n".join([lines[0], json.dumps(broken)]) + "\n")
    with pytest.raises(FileNotFoundError, match=r"1 image file of the dataset does not exist .* row 1: .*missing.png"):
        load_conversational_dataset(str(tmp_path / "train.jsonl"))


def test_sparse_collator_names_or_skips_bad_samples(workspace, tmp_path):
    from hf_sparse_mllm.data.samples import BadSampleError

    (tmp_path / "img").symlink_to(workspace[0] / "data" / "img")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [json.loads(line) for line in open(workspace[2])]
    rows[3]["images"] = ["broken.png"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--model_name_or_path", workspace[1], "--dataset_name", str(tmp_path / "train.jsonl"), "--output_dir",
            str(tmp_path / "out"), "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--collator", "sparse", "--dataloader_drop_last", "false"]  # fmt: skip
    with pytest.raises(BadSampleError, match="dataset index 3: images\\[0\\]"):
        cli_train.train(*cli_train.parse_args(argv))
    trainer = cli_train.train(*cli_train.parse_args([*argv, "--skip_bad_samples"]))
    assert trainer.state.global_step == 3
    assert sum(entry.get("sparse/skipped_samples", 0) for entry in trainer.state.log_history) == 1


# ---- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--keep_ratio", "abc"], "--keep_ratio"),
        (["--layer_skip_policy", "nope"], "layer_skip_policy must be one of"),
        (["--keep_ratio", "1.5"], r"keep_ratio must be in (0, 1], got 1.5"),
        (["--stage", "pretrain"], "--stage"),
        (["--keep_ratioo", "0.2"], "--keep_ratioo: did you mean --keep_ratio?"),
        (["--skip_bad_samples"], "--skip_bad_samples needs --collator sparse"),
        (["--learning_rate", "fast"], "--learning_rate"),
    ],
)
def test_bad_flags_and_values_exit_with_an_error_naming_them(extra, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_train.parse_args(["--model_name_or_path", "m", "--dataset_name", "d", *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: hf-sparse-mllm train" in error and named in error, error


@pytest.mark.parametrize(
    "text, named",
    [
        ("keep_ratio: abc\n", "--keep_ratio"),
        ("keep_ratio: 1.5\n", "keep_ratio must be in (0, 1], got 1.5"),
        ("token_compresor: pool\n", "unknown keys in the --config file: token_compresor"),
        ("skip_layers: [a]\n", "skip_layers"),
    ],
)
def test_bad_yaml_keys_and_values_exit_with_an_error_naming_them(text, named, tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("model_name_or_path: m\ndataset_name: d\n" + text)
    with pytest.raises(SystemExit) as exit_info:
        cli_train.parse_args(["--config", str(tmp_path / "recipe.yaml")])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_sparse_seed_defaults_to_the_training_seed():
    base = ["--model_name_or_path", "m", "--dataset_name", "d"]
    *_, sparse_config = cli_train.parse_args([*base, "--seed", "7"])
    assert sparse_config.seed == 7
    _, training_args, _, sparse_config = cli_train.parse_args([*base, "--seed", "7", "--sparse_seed", "3"])
    assert sparse_config.seed == 3 and training_args.seed == 7


def test_model_name_is_required(capsys):
    with pytest.raises(SystemExit):
        cli_train.parse_args(["--dataset_name", "d"])
    assert "--model_name_or_path" in capsys.readouterr().err


# ---- help and entry points ------------------------------------------------------------------------------------------


def test_python_dash_m_help_lists_the_commands(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m hf_sparse_mllm", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("hf_sparse_mllm", run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for command in ("train", "eval", "analyze"):
        assert command in printed
    assert main([]) == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit"])
    assert "invalid choice: 'fit'" in capsys.readouterr().err


def test_console_script_is_declared():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '[project.scripts]\nhf-sparse-mllm = "hf_sparse_mllm.cli:main"' in text
    assert EntryPoint(name="hf-sparse-mllm", value="hf_sparse_mllm.cli:main", group="console_scripts").load() is main


def test_train_help_shows_every_sparse_field_with_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "usage: hf-sparse-mllm train" in help_text and "sparse training (hf_sparse_mllm.SparseMLLMConfig)" in help_text
    )
    for f in dataclasses.fields(SparseMLLMConfig):
        if f.name in PACKAGE_FIELDS:  # written by the package, no flag
            assert f"--{f.name}" not in help_text
            continue
        flag = "--sparse_seed" if f.name == "seed" else f"--{f.name}"
        assert f"{flag} " in help_text, flag
        assert " ".join(f.metadata["help"].split()) in help_text, f.name
    # The defaults that differ from SFTConfig's say so.
    assert "on where the hardware supports bfloat16" in help_text and "SFTConfig: 1024" in help_text


def test_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    assert cli_train.SFTArguments(output_dir=str(tmp_path)).bf16 is False  # this CPU-only machine
    assert cli_train.SFTArguments(output_dir=str(tmp_path)).max_length is None
    monkeypatch.setattr(cli_train, "is_torch_bf16_gpu_available", lambda: True)
    assert cli_train.SFTArguments(output_dir=str(tmp_path), use_cpu=True).bf16 is False
    # Where the hardware has bfloat16, it is on: TrainingArguments, which checks the real hardware, then refuses it.
    with pytest.raises(ValueError, match="bf16"):
        cli_train.SFTArguments(output_dir=str(tmp_path))


# ---- eval ----------------------------------------------------------------------------------------------------------


def _exact_match(prediction: str, target: str) -> float:
    # GQA's rule written out: strip the prediction, lower-case both, delete ASCII punctuation.
    strip = str.maketrans("", "", string.punctuation)
    return float(prediction.strip().lower().translate(strip) == target.lower().translate(strip))


def test_eval_conversational_scores_equal_a_hand_computation(trained, tmp_path):
    output_dir, _ = trained
    data = output_dir + "/../data/train.jsonl"
    assert (
        main(["eval", "--model_path", output_dir, "--tasks", f"conversational={data}", "--max_new_tokens", "2"]) == 0
    )
    first = [json.loads(line) for line in open(f"{output_dir}/eval/full/samples_conversational.jsonl")]
    # Targets made from the predictions, so that both metrics see matches and they differ: the same prompts (and so
    # the same answers) with the answer itself, shouted, after an article, and a word it never says.
    rows = [json.loads(line) for line in open(data)]
    for i, (row, record) in enumerate(zip(rows, first)):
        prediction = record["filtered_resps"][0]
        target = [prediction, prediction.upper() + "!", "the " + prediction, "zebra"][i % 4]
        row["messages"][-1]["content"][0]["text"] = target
    derived = tmp_path / "derived.jsonl"
    derived.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "img").symlink_to(output_dir + "/../data/img")

    assert main(["eval", "--model_path", output_dir, "--tasks", f"conversational={derived}", "--max_new_tokens", "2",
                 "--output_dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    results = json.loads((tmp_path / "eval" / "full" / "results.json").read_text())["results"]["conversational"]
    records = [json.loads(line) for line in open(tmp_path / "eval" / "full" / "samples_conversational.jsonl")]
    assert [r["filtered_resps"] for r in records] == [r["filtered_resps"] for r in first]
    exact = [_exact_match(r["filtered_resps"][0], r["target"]) for r in records]
    normalized = [
        float(normalize_vqa_answer(r["filtered_resps"][0]) == normalize_vqa_answer(r["target"])) for r in records
    ]
    assert results["exact_match,none"] == pytest.approx(sum(exact) / len(exact))
    assert results["normalized_match,none"] == pytest.approx(sum(normalized) / len(normalized))
    assert [r["exact_match"] for r in records] == exact and [r["normalized_match"] for r in records] == normalized
    assert 0 < results["exact_match,none"] < results["normalized_match,none"]  # "the x" matches only when normalised
    assert records[0]["arguments"]["prompt"].startswith("<s> user : <image> what color is it ?")
    assert records[1]["target"] == records[1]["filtered_resps"][0].upper() + "!"


def test_conversational_prompt_is_the_conversation_up_to_the_last_answer():
    task = get_task("conversational", prompt_kwargs={"post_prompt": " Answer briefly."})
    image = {"type": "image", "text": None}
    doc = {
        "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "what is it ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]},
            {"role": "user", "content": "what color ?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Red"}, {"type": "text", "text": "."}]},
        ]
    }
    messages = task.messages(doc, num_images=1)
    assert messages[:2] == doc["messages"][:2] and messages[2] == {
        "role": "user",
        "content": "what color ? Answer briefly.",
    }
    assert task.doc_to_target(doc) == "Red."
    assert task.prompt(doc) == "user: <image>what is it ?\nassistant: a circle\nuser: what color ? Answer briefly."
    assert task.process_results(doc, "red") == {"exact_match": 1.0, "normalized_match": 1.0}
    # GQA's rule deletes punctuation; VQA's normalisation spaces out a hyphen.
    shirt = {"messages": [*doc["messages"][:3], {"role": "assistant", "content": "T-shirt"}]}
    assert task.process_results(shirt, "tshirt") == {"exact_match": 1.0, "normalized_match": 0.0}
    assert task.process_results({"messages": [*doc["messages"][:3], {"role": "assistant", "content": "the two"}]},
                                "2") == {"exact_match": 0.0, "normalized_match": 1.0}  # fmt: skip
    with pytest.raises(ValueError, match="no assistant turn"):
        task.doc_to_target({"messages": doc["messages"][:1]})


def test_prompt_suffix_replaces_every_task_suffix():
    gqa, conversational = cli_eval.build_tasks(["gqa=x", "conversational=y"], prompt_suffix="\\nShort answer.")
    assert gqa.prompt({"question": "Is it red?"}) == "Is it red?\nShort answer."
    assert (
        conversational.prompt(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        )
        == "hi\nShort answer."
    )
    (gqa,) = cli_eval.build_tasks(["gqa"], prompt_suffix="")
    assert gqa.prompt({"question": "Is it red?"}) == "Is it red?"
    assert cli_eval.build_tasks(["gqa"])[0].prompt({"question": "q"}).endswith("single word or phrase.")


def test_eval_bad_flags_exit_with_an_error_naming_them(capsys):
    for argv, named in [
        (["--model_path", "m", "--modes", "divprune"], "not `full` or"),
        (["--model_path", "m", "--tasks", "nope=x"], "Unknown task 'nope'"),
        (["--model_path", "m", "--batch_size", "x"], "--batch_size"),
        (
            ["--model_path", "m", "--modez", "full"],
            "unrecognized arguments: --modez full (--modez: did you mean --modes?)",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", *argv])
        assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_eval_default_output_dir_is_inside_the_model_folder(tmp_path):
    assert cli_eval.default_output_dir(str(tmp_path)) == str(tmp_path / "eval")
    assert cli_eval.default_output_dir("org/model") == "outputs/eval/model"


@pytest.fixture(scope="module")
def yes_no():
    return two_answer_model()


def test_conversational_task_prompts_with_the_whole_conversation(tmp_path, yes_no):
    from hf_sparse_mllm.evaluation.generation import render_prompt

    model, processor = yes_no
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is it red ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        {"role": "user", "content": [{"type": "text", "text": "is it blue ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]
    (tmp_path / "test.jsonl").write_text(json.dumps({"images": ["red.png"], "messages": messages}) + "\n")
    task = get_task("conversational", dataset_path=str(tmp_path / "test.jsonl"), max_new_tokens=1)
    (record,) = evaluate(model, processor, [task], progress=False)["samples"]["conversational"]
    assert record["arguments"]["prompt"] == render_prompt(processor, messages[:3])
    assert "yes" in record["arguments"]["prompt"] and record["target"] == "no"
    assert record["filtered_resps"][0] in ("yes", "no")


def test_evaluate_command(tmp_path, yes_no, capsys, monkeypatch):
    model, processor = yes_no
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data = save_vqa(tmp_path / "data", n=8)
    script = cli_eval
    args = script.EvaluateArguments(
        model_path=str(tmp_path / "model"),
        tasks=[f"sparse_vqa={data}"],
        modes=["full", "divprune@0.5", "pool@4"],
        output_dir=str(tmp_path / "eval"),
        max_new_tokens=1,
        update_model_card=True,
    )
    runs = script.run(args)
    printed = capsys.readouterr().out
    assert "## Comparison" in printed and "divprune@0.5 - full" in printed
    for mode in ("full", "divprune_0.5", "pool_4"):
        assert (tmp_path / "eval" / mode / "results.json").exists()
        assert (tmp_path / "eval" / mode / "samples_sparse_vqa.jsonl").exists()
    assert (tmp_path / "eval" / "comparison.md").exists()
    assert (
        runs["pool@4"]["config"]["model_args"] == f"pretrained={tmp_path / 'model'},token_compressor=pool,num_keep=4"
    )
    # The saved model gives the same answers as the in-memory one.
    direct = evaluate(model, processor, [get_task("sparse_vqa", dataset_path=data)], max_new_tokens=1, progress=False)
    assert direct["results"] == runs["full"]["results"]
    assert "model-index" in (tmp_path / "model" / "README.md").read_text()

    # Without a path, sparse_vqa generates its test scenes at the model's geometry (12 of them here, not 1,000).
    geometries = []

    build = tasks.sparse_vqa_test_docs

    def few_scenes(**geometry):
        geometries.append(geometry)
        return build(num_test=12, **geometry)

    monkeypatch.setattr(tasks, "sparse_vqa_test_docs", few_scenes)
    default = script.run(
        script.EvaluateArguments(
            model_path=str(tmp_path / "model"), output_dir=str(tmp_path / "eval2"), limit=6, max_new_tokens=1
        )
    )
    assert geometries[0] == {"image_size": 32, "cell_size": 8}
    assert default["full"]["n-samples"]["sparse_vqa"] == {"original": 12, "effective": 6}

    with pytest.raises(ValueError, match="Unknown token compressor 'nope'"):
        script.run(script.EvaluateArguments(model_path=str(tmp_path / "model"), modes=["nope@0.5"]))
    with pytest.raises(ValueError, match="not `full` or"):
        script.parse_mode("divprune")
    with pytest.raises(FileNotFoundError, match="Model folder"):
        script.run(script.EvaluateArguments(model_path=str(tmp_path / "missing")))


# ---- analyze -------------------------------------------------------------------------------------------------------


def test_analyze_command_reads_the_training_format(trained, tmp_path, capsys):
    output_dir, _ = trained
    data = output_dir + "/../data/train.jsonl"
    argv = ["analyze", "--model", output_dir, "--dataset", data, "--batch_size", "3", "--num_batches", "2",
            "--output", str(tmp_path / "report")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "report" / "redundancy.json").read_text())
    assert len(report["layer_similarity"]) == 2 and (tmp_path / "report" / "redundancy.md").exists()
    assert "| decoder layer |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["analyze", "--num_batches", "0"])
    with pytest.raises(SystemExit):
        main(["analyze", "--batches", "2"])
    assert "unrecognized arguments: --batches 2" in capsys.readouterr().err


def test_docstring_examples(tmp_path, monkeypatch):
    import doctest

    from hf_sparse_mllm.cli import arguments
    from hf_sparse_mllm.data import conversational

    monkeypatch.chdir(tmp_path)
    for module in (arguments, conversational, sys.modules["hf_sparse_mllm.cli"]):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__
