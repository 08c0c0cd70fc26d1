"""`SparseMLLMConfig`: typed fields with their string forms, command-line and YAML parsing, decoder-depth checks."""

from __future__ import annotations

import dataclasses
import doctest
import json
import re

import numpy as np
import pytest
from transformers import HfArgumentParser

from hf_sparse_mllm import SPARSE_CONFIG_NAME, SparseMLLMConfig
from hf_sparse_mllm import config as config_module
from hf_sparse_mllm.compressors import list_compressors
from hf_sparse_mllm.skipping import get_skip_policy, list_skip_policies

# field: (accepted values with what they become, rejected values). Every field has a row (checked below).
FIELD_CASES = {
    "token_compressor": (
        [("pool", "pool"), (None, None), ("none", None), ("NULL", None)],
        ["nope", 3, True, ["pool"]],
    ),
    "keep_ratio": (
        [("0.2", 0.2), (" 0.5 ", 0.5), ("1e-1", 0.1), (1, 1.0), (np.float32(0.5), 0.5)],
        ["0.2x", "", True, None, "nan", float("nan"), 0, 1.5, [0.2]],
    ),
    "num_keep": (
        [("3", 3), (7, 7), (np.int64(7), 7), (None, None), ("none", None)],
        [2.0, "3.0", True, 0, "-1", "x", [3]],
    ),
    "slow_mode_prob": ([("0", 0.0), ("1", 1.0), (0, 0.0), (0.5, 0.5)], [1.5, -0.1, "high", False, None]),
    "num_isolator_tokens": ([("0", 0), (2, 2)], [2.0, -1, True, "2.5", None]),
    "distill_weight": ([("0", 0.0), ("2.5", 2.5)], [-1, "inf", float("inf"), True, None]),
    "distill_temperature": ([("0.5", 0.5), (2, 2.0)], [0, "0", -1, True, None]),
    "stage": ([("alignment", "alignment"), ("auto", "auto"), ("instruction", "instruction")], ["pretrain", None, 1]),
    "seed": ([("7", 7), (0, 0)], [-1, True, 1.0, "seven", None]),
    "max_nonfinite_steps": ([("5", 5), (1, 1)], [0, "0", True, 2.0, None]),
    "layer_skip_policy": ([("stochastic", "stochastic"), ("none", None), (None, None)], ["drop", 1, True]),
    "skip_ratio": ([("0.5", 0.5), (0, 0.0)], [1.0, -0.1, "1", True, None]),
    "max_skip_prob": ([("0.3", 0.3)], [1.0, "x", True, None]),
    "protect_layers": ([("0", 0), (2, 2)], [-1, 1.0, True, "1.0", None]),
    "measure_every": ([("10", 10)], [0, 1.5, True, None]),
    "skip_layers": (
        [
            ("1,2", [1, 2]),
            ("1, 2", [1, 2]),
            ("3 4", [3, 4]),
            (["1", "2"], [1, 2]),
            ((3,), [3]),
            ([], []),
            ("none", None),
        ],
        [[1.5], [True], [None], [-1], "1;2", "", 3, {1: 2}],
    ),
    "skip_on_slow_steps": (
        [("true", True), ("No", False), ("1", True), ("0", False), ("y", True), (False, False)],
        ["maybe", 1, 0, None, "none", ""],
    ),
    "stage_aware": ([("false", False), ("YES", True), ("T", True), (True, True)], ["no!", 0, 2, None, "null"]),
    "sparse_mllm_version": ([("0.0.1", "0.0.1")], [1, None]),
    "resume_note": ([("at step 2, seed 42 -> 7", "at step 2, seed 42 -> 7"), (None, None), ("none", None)], [1, 2.5]),
}


def test_every_field_has_a_row():
    assert set(FIELD_CASES) == {f.name for f in dataclasses.fields(SparseMLLMConfig)}


@pytest.mark.parametrize(
    "name,given,expected", [(name, g, e) for name, (accepted, _) in FIELD_CASES.items() for g, e in accepted]
)
def test_field_accepts_its_type_and_string_forms(name, given, expected):
    value = getattr(SparseMLLMConfig(**{name: given}), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name,given", [(name, g) for name, (_, rejected) in FIELD_CASES.items() for g in rejected])
def test_field_rejects_other_values_naming_field_and_value(name, given):
    with pytest.raises(ValueError, match=rf"^{name} must ") as error:
        SparseMLLMConfig(**{name: given})
    assert f"got {given!r}" in str(error.value)


def test_error_message_names_field_expected_type_range_and_value():
    with pytest.raises(ValueError) as error:
        SparseMLLMConfig(keep_ratio="0.2x")
    assert str(error.value) == "keep_ratio must be a float in (0, 1], got '0.2x' (str)."
    with pytest.raises(ValueError) as error:
        SparseMLLMConfig(num_keep=2.0)
    assert str(error.value) == "num_keep must be an int >= 1 or None, got 2.0 (float)."
    with pytest.raises(ValueError) as error:
        SparseMLLMConfig(skip_layers=[1.5])
    assert str(error.value) == "skip_layers must be a list of ints, each >= 0, or None, got [1.5] (list)."
    with pytest.raises(ValueError) as error:
        SparseMLLMConfig(stage_aware="nope")
    assert str(error.value) == "stage_aware must be a bool (true or false), got 'nope' (str)."
    with pytest.raises(ValueError) as error:
        SparseMLLMConfig(distill_weight=float("inf"))
    assert str(error.value) == "distill_weight must be a finite float >= 0, got inf (float)."


def test_unknown_and_positional_arguments_are_type_errors():
    with pytest.raises(TypeError, match=r"'keep_ration' \(did you mean 'keep_ratio'\?\)"):
        SparseMLLMConfig(keep_ration=0.2)
    with pytest.raises(TypeError):
        SparseMLLMConfig("divprune")


def test_replace_and_equality_go_through_the_same_checks():
    config = SparseMLLMConfig(keep_ratio=0.5)
    assert dataclasses.replace(config, keep_ratio="0.5") == config
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        dataclasses.replace(config, keep_ratio=2)


# ---- command line and YAML -------------------------------------------------------------------------------------------


def test_argument_parser_builds_a_config_equal_to_the_python_one():
    parser = HfArgumentParser(SparseMLLMConfig)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--keep_ratio", "0.2", "--stage_aware", "false", "--skip_layers", "1", "2"]
    )
    assert parsed == SparseMLLMConfig(keep_ratio=0.2, stage_aware=False, skip_layers=[1, 2])
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--token-compressor", "none", "--no_stage_aware", "--stage", "alignment"]
    )
    assert parsed == SparseMLLMConfig(token_compressor=None, stage_aware=False, stage="alignment")


def test_yaml_and_dict_values_are_converted_like_python_ones(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('keep_ratio: "0.2"\nstage_aware: no\nskip_layers: "1,2"\nnum_keep: null\nseed: "7"\n')
    (parsed,) = HfArgumentParser(SparseMLLMConfig).parse_yaml_file(recipe)
    assert parsed == SparseMLLMConfig(keep_ratio=0.2, stage_aware=False, skip_layers=[1, 2], seed=7)


def test_argument_parser_rejects_values_naming_the_flag_or_field(capsys):
    parser = HfArgumentParser(SparseMLLMConfig)
    for argv, flag in [(["--keep_ratio", "0.2x"], "--keep_ratio"), (["--stage", "pretrain"], "--stage")]:
        with pytest.raises(SystemExit):
            parser.parse_args_into_dataclasses(argv)
        assert flag in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 1.5"):
        parser.parse_args_into_dataclasses(["--keep_ratio", "1.5"])


def test_every_field_is_a_flag_with_help():
    parser = HfArgumentParser(SparseMLLMConfig)
    actions = {action.dest: action for action in parser._actions}
    for f in dataclasses.fields(SparseMLLMConfig):
        assert actions[f.name].help and f.metadata["help"] == actions[f.name].help, f.name
    help_text = " ".join(parser.format_help().split())
    assert f"Registered visual token compressor ({', '.join(list_compressors())})" in help_text
    assert f"Registered layer-skip policy ({', '.join(list_skip_policies())})" in help_text
    assert "read by the redundancy skip policy" in help_text  # skip_ratio's readers, from the registry


# ---- saving and loading ----------------------------------------------------------------------------------------------


def test_saved_file_round_trips_and_loading_takes_overrides(tmp_path):
    config = SparseMLLMConfig(layer_skip_policy="fixed", skip_layers=[1, 2], keep_ratio=0.5)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / SPARSE_CONFIG_NAME).read_text())
    assert saved == {"model_type": "sparse_mllm", **config.recipe_dict()}
    assert SparseMLLMConfig.from_pretrained(tmp_path) == config
    assert SparseMLLMConfig.from_pretrained(tmp_path, keep_ratio="0.1").keep_ratio == 0.1
    with pytest.raises(TypeError, match="did you mean 'keep_ratio'"):
        SparseMLLMConfig.from_pretrained(tmp_path, keep_ration=0.1)
    with pytest.raises(ValueError, match="skip_layers must"):
        SparseMLLMConfig.from_dict({**saved, "skip_layers": [0.5]})


def test_loading_passes_hub_arguments_to_cached_file(tmp_path):
    config = SparseMLLMConfig(keep_ratio=0.5)
    config.save_pretrained(tmp_path / "recipe")
    loaded = SparseMLLMConfig.from_pretrained(tmp_path, subfolder="recipe", local_files_only=True, seed=3)
    assert loaded == SparseMLLMConfig(keep_ratio=0.5, seed=3)
    with pytest.raises(OSError, match="has no sparse_mllm_config.json"):
        SparseMLLMConfig.from_pretrained(tmp_path, subfolder="elsewhere", local_files_only=True)
    with pytest.raises(TypeError, match="'revison' \\(did you mean 'revision'\\?\\)"):
        SparseMLLMConfig.from_pretrained("org/never-downloaded", revison="dev")


# ---- layer skipping: one rule for protect_layers, no setting that never skips ------------------------------------


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(layer_skip_policy="stochastic", max_skip_prob=0.0), r"max_skip_prob=0.0 never skips a layer"),
        (dict(layer_skip_policy="redundancy", skip_ratio=0.0), r"skip_ratio=0.0 .* never skips a layer"),
        (dict(layer_skip_policy="redundancy", max_skip_prob="0"), r"max_skip_prob=0.0 never skips a layer"),
        (dict(layer_skip_policy="fixed"), "needs skip_layers"),
        (dict(layer_skip_policy="fixed", skip_layers=[]), "needs skip_layers"),
        # layer 0 is protected whatever the depth
        (dict(layer_skip_policy="fixed", skip_layers=[0, 2]), r"skip_layers \[0\] are protected by protect_layers=1"),
    ],
)
def test_settings_that_never_skip_are_rejected_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SparseMLLMConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,num_layers,pattern",
    [
        # 4 - 2 * 2 leaves no layer to skip
        (dict(layer_skip_policy="stochastic", protect_layers=2), 4, r"4 - 2 \* 2 = 0 layers would be left to skip"),
        (dict(layer_skip_policy="redundancy", protect_layers=2), 4, r"4 - 2 \* 2 = 0 layers would be left to skip"),
        # round(0.1 * 4) = 0 layers a step
        (dict(layer_skip_policy="redundancy", skip_ratio=0.1), 4, r"= min\(0, 1\) = 0 layers a step"),
        # floor(0.2 * 2 unprotected layers) = 0 layers a step
        (dict(layer_skip_policy="redundancy", max_skip_prob=0.2), 4, r"= min\(1, 0\) = 0 layers a step"),
        (
            dict(layer_skip_policy="fixed", skip_layers=[2, 3]),
            4,
            r"skip_layers \[3\] are protected by protect_layers=1",
        ),
        (dict(layer_skip_policy="fixed", skip_layers=[2], protect_layers=2), 4, r"skip_layers \[2\] are protected"),
        (dict(layer_skip_policy="fixed", skip_layers=[4]), 4, r"skip_layers \[4\] are out of range"),
    ],
)
def test_settings_that_never_skip_are_rejected_with_the_decoder_depth(kwargs, num_layers, pattern):
    config = SparseMLLMConfig(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        config.check_decoder_depth(num_layers)


@pytest.mark.parametrize(
    "kwargs,num_layers",
    [
        (dict(layer_skip_policy="stochastic", protect_layers=1), 3),
        (dict(layer_skip_policy="redundancy", skip_ratio=0.25, max_skip_prob=0.5), 4),
        (dict(layer_skip_policy="fixed", skip_layers=[0, 3], protect_layers=0), 4),  # protect_layers=0 frees the ends
        (dict(layer_skip_policy="fixed", skip_layers=[1, 2]), 4),
    ],
)
def test_settings_that_skip_pass_the_depth_check(kwargs, num_layers):
    SparseMLLMConfig(**kwargs).check_decoder_depth(num_layers)


def test_fields_of_other_policies_are_reported_as_ignored(caplog):
    with caplog.at_level("WARNING", logger="hf_sparse_mllm.config"):
        SparseMLLMConfig(layer_skip_policy="stochastic", skip_ratio=0.3, measure_every=5, protect_layers=2)
    assert (
        "skip_ratio, measure_every are only used by other layer skip policies; ignored with 'stochastic'"
        in caplog.text
    )


def test_skip_fields_are_those_the_built_in_policies_read():
    read = {name for policy in ("fixed", "redundancy", "stochastic") for name in get_skip_policy(policy).fields}
    assert set(config_module._SKIP_FIELDS) == read


def test_docstring_examples():
    class FencedParser(doctest.DocTestParser):
        def parse(self, string, name="<string>"):
            return super().parse(re.sub(r"(?m)^[ \t]*```.*$", "", string), name)

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(parser=FencedParser()).find(config_module):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0
