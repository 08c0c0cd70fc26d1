"""`make bench-accuracy` smoke path: recipes train, both evaluations are reported, and --resume keeps finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import bench_accuracy

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.fixture
def bench():
    threads = torch.get_num_threads()
    recipes = dict(bench_accuracy.RECIPES)
    yield bench_accuracy
    torch.set_num_threads(threads)  # main() sets the benchmark's own thread count
    bench_accuracy.RECIPES.clear()  # a test may redefine a recipe
    bench_accuracy.RECIPES.update(recipes)


def _common(tmp_path, output="bench"):
    return [
        "--quick",
        "--no-curve",
        "--no-progress",
        "--output",
        str(tmp_path / output),
        "--data-dir",
        str(tmp_path / "data"),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]


def test_quick_bench_writes_results_and_resumes(bench, tmp_path, capsys):
    common = _common(tmp_path)
    results = tmp_path / "bench" / "accuracy-quick.json"
    first = bench.main(["--recipes", "naive-divprune-0.25", *common])
    capsys.readouterr()
    second = bench.main(["--recipes", "naive-divprune-0.25,dualspeed-divprune-0.25", "--resume", *common])
    printed = capsys.readouterr().out

    saved = json.loads(results.read_text())
    assert set(saved["summary"]) == {"baseline", "naive-divprune-0.25", "dualspeed-divprune-0.25"}
    for name, summary in saved["summary"].items():
        assert 0.0 <= summary["full_accuracy_mean"] <= 1.0 and 0.0 <= summary["compressed_accuracy_mean"] <= 1.0
        assert summary["speedup"] > 0, name
    # The resumed invocation trained only the new recipe and kept the earlier runs as they were.
    assert "seed 0: baseline\n" not in printed and "seed 0: dualspeed-divprune-0.25\n" in printed
    assert second["runs"]["baseline"] == json.loads(json.dumps(first["runs"]["baseline"]))
    assert "| dualspeed-divprune-0.25 |" in (tmp_path / "bench" / "accuracy-quick.md").read_text()

    # Everything asked for is finished: nothing trains; the recipe not asked for leaves the summary but stays in
    # the file, and the benchmark time counts only the runs in the summary (a marked run time shows which).
    saved["runs"]["naive-divprune-0.25"][0]["run_seconds"] = 1e6
    results.write_text(json.dumps(saved))
    third = bench.main(["--recipes", "dualspeed-divprune-0.25", "--seeds", "0,", "--resume", *common])
    printed = capsys.readouterr().out
    assert "[bench-accuracy] seed 0:" not in printed
    saved = json.loads(results.read_text())
    assert set(saved["summary"]) == set(third["summary"]) == {"baseline", "dualspeed-divprune-0.25"}
    assert [r["seed"] for r in saved["runs_not_in_summary"]["naive-divprune-0.25"]] == [0]
    kept = sum(r["run_seconds"] for done in saved["runs"].values() for r in done)
    assert kept <= saved["total_seconds"] < 1e6

    # ...and comes back when asked for again, untrained.
    fourth = bench.main(["--recipes", "naive-divprune-0.25,dualspeed-divprune-0.25", "--resume", *common])
    assert "[bench-accuracy] seed 0:" not in capsys.readouterr().out
    assert set(fourth["summary"]) == set(second["summary"]) and fourth["total_seconds"] > 1e6


def test_resume_refuses_other_configurations_and_retrains_incompatible_runs(bench, tmp_path, capsys):
    common = _common(tmp_path)
    results = tmp_path / "bench" / "accuracy-quick.json"
    bench.main(["--recipes", "naive-divprune-0.25", *common])
    before = results.read_text()
    capsys.readouterr()

    # Another configuration (here: more steps) is refused, and the saved runs are left alone.
    with pytest.raises(SystemExit):
        bench.main(["--recipes", "naive-divprune-0.25", "--steps", "4", "--resume", *common])
    assert "differs in ['max_steps']" in capsys.readouterr().err and results.read_text() == before
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "0,one", *common])
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err

    # A run timed on another kind of machine, or of a recipe defined differently now, is trained again.
    saved = json.loads(before)
    saved["runs"]["baseline"][0]["machine"]["threads"] += 1
    saved["runs"]["renamed-recipe"] = [{**saved["runs"]["naive-divprune-0.25"][0]}]
    results.write_text(json.dumps(saved))
    bench.RECIPES["naive-divprune-0.25"] = {**bench.RECIPES["naive-divprune-0.25"], "keep_ratio": 0.5}
    bench.main(["--recipes", "naive-divprune-0.25", "--resume", *common])
    printed = capsys.readouterr().out
    assert "dropping the earlier run of baseline seed 0: it was timed on another machine" in printed
    assert "dropping the earlier run of naive-divprune-0.25 seed 0: its recipe is no longer" in printed
    assert "dropping the earlier run of renamed-recipe seed 0: its recipe is no longer" in printed
    assert "seed 0: baseline\n" in printed and "seed 0: naive-divprune-0.25\n" in printed
    assert json.loads(results.read_text())["runs"]["naive-divprune-0.25"][0]["sparse_recipe"]["keep_ratio"] == 0.5


def test_merge_summarises_seeds_run_in_separate_processes(bench, tmp_path, capsys):
    """Seeds trained side by side into separate results files give one summary, with nothing trained again."""
    recipes = ["--recipes", "naive-divprune-0.25"]
    files = []
    for seed in (0, 1):
        bench.main([*recipes, "--seeds", str(seed), *_common(tmp_path, f"s{seed}")])
        files.append(str(tmp_path / f"s{seed}" / "accuracy-quick.json"))
    separate = [json.loads(Path(f).read_text())["runs"] for f in files]
    capsys.readouterr()

    merged = bench.main([*recipes, "--seeds", "0,1", "--merge", *files, *_common(tmp_path, "both")])
    assert "[bench-accuracy] seed" not in capsys.readouterr().out
    for name in ("baseline", "naive-divprune-0.25"):
        assert json.loads(json.dumps(merged["runs"][name])) == [separate[0][name][0], separate[1][name][0]]
        assert merged["summary"][name]["seeds"] == 2
    # A seed found in two files is kept once; a missing file is an error naming the option.
    again = bench.main([*recipes, "--seeds", "0,1", "--merge", *files, files[0], *_common(tmp_path, "both")])
    assert len(again["runs"]["baseline"]) == 2
    assert "baseline seed 0 is already kept from an earlier file" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--merge", str(tmp_path / "missing.json"), *_common(tmp_path)])
    assert "--merge: no results file" in capsys.readouterr().err
    # A merged file of another configuration is refused (without --resume's hint about replacing the output file).
    with pytest.raises(SystemExit):
        bench.main([*recipes, "--steps", "4", "--merge", files[0], *_common(tmp_path, "other")])
    error = capsys.readouterr().err
    assert "--merge:" in error and "differs in ['max_steps']" in error and "without --resume" not in error
    # With --resume too: seed 0 from the output file, seed 1 from the merged one, nothing trained.
    both = bench.main([*recipes, "--seeds", "0,1", "--resume", "--merge", files[1], *_common(tmp_path, "s0")])
    assert "[bench-accuracy] seed" not in capsys.readouterr().out
    assert [r["seed"] for r in both["runs"]["naive-divprune-0.25"]] == [0, 1]


def test_quick_deep_bench_skips_layers(bench, tmp_path):
    """`--quick --preset bench-deep` keeps the 4-layer decoder, so the STS recipe really skips (middle) layers."""
    report = bench.main(
        ["--preset", "bench-deep", "--recipes", "sts-divprune-0.1-skip0.25-slowskip", *_common(tmp_path)]
    )
    assert report["config"]["num_hidden_layers"] == 4
    assert (tmp_path / "bench" / "accuracy-bench-deep-quick.json").is_file()
    (run,) = report["runs"]["sts-divprune-0.1-skip0.25-slowskip"]
    frequency = run["skip_frequency"]
    assert sorted(frequency) == ["layer_00", "layer_01", "layer_02", "layer_03"]
    assert frequency["layer_00"] == frequency["layer_03"] == 0 and frequency["layer_01"] + frequency["layer_02"] > 0


def test_every_recipe_is_a_valid_sparse_config(bench):
    """A typo in a recipe (an unknown field, a value out of range) fails here, not an hour into `make bench`."""
    for preset in ("bench-deep", "bench-deep8"):
        config = bench.DEMO_PRESETS[preset]
        for name, spec in bench.RECIPES.items():
            if spec is None:
                continue
            sparse = config.sparse_config(**spec)  # unknown fields and values out of range raise here
            assert {k: sparse.recipe_dict()[k] for k in spec} == spec, f"{preset}: {name}"
            sparse.check_decoder_depth(config.model.num_hidden_layers)


@pytest.mark.parametrize(
    "results,preset",
    [
        ("accuracy.json", "bench"),
        ("accuracy-bench-deep.json", "bench-deep"),
        ("bench-deep-3seeds/accuracy-bench-deep.json", "bench-deep"),
        ("accuracy-bench-deep8.json", "bench-deep8"),
        ("accuracy-bench-qwen2vl.json", "bench-qwen2vl"),
    ],
)
def test_committed_results_match_their_presets(bench, results, preset):
    """The presets are the ones the committed results were measured with (same data, model shapes, seeds, steps)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / results
    saved = json.loads(path.read_text())["config"]
    assert bench.DemoConfig.from_dict(saved) == bench.DEMO_PRESETS[preset]


COMMITTED = [
    ("accuracy.json", "bench"),
    ("accuracy-bench-deep.json", "bench-deep"),
    ("bench-deep-3seeds/accuracy-bench-deep.json", "bench-deep"),
    ("accuracy-bench-deep8.json", "bench-deep8"),
    ("accuracy-bench-qwen2vl.json", "bench-qwen2vl"),
]


@pytest.mark.parametrize("results,preset", COMMITTED)
@pytest.mark.parametrize("later_version", [False, True])
def test_committed_runs_stay_finished_for_the_current_recipes(bench, tmp_path, capsys, results, preset, later_version):
    """`--resume`/`--merge` keep every committed run, also once the recipe gained fields and the version changed."""
    saved = json.loads((RESULTS / results).read_text())
    if later_version:  # what a file written before `max_nonfinite_steps` existed looks like to a later version
        for done in [*saved["runs"].values(), *(saved.get("runs_not_in_summary") or {}).values()]:
            for run in done:
                if run["sparse_recipe"] is not None:
                    run["sparse_recipe"].pop("max_nonfinite_steps", None)
                    run["sparse_recipe"].update(sparse_mllm_version="0.0.1", resume_note="at step 5, seed 0 -> 1")
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps(saved))
    kept = bench._finished_runs(path, bench.DEMO_PRESETS[preset], saved["machine"])
    runs = {**(saved.get("runs_not_in_summary") or {}), **saved["runs"]}
    assert {name: len(done) for name, done in kept.items()} == {name: len(done) for name, done in runs.items()}
    assert "dropping" not in capsys.readouterr().out


def test_same_recipe_compares_what_trains(bench):
    config = bench.DEMO_PRESETS["bench"].sparse_config(**bench.RECIPES["dualspeed-divprune-0.1"])
    saved = json.loads(json.dumps(config.recipe_dict()))
    assert bench.same_recipe(saved, config) and bench.same_recipe(None, None)
    assert not bench.same_recipe(None, config) and not bench.same_recipe(saved, None)
    for field, value in [("keep_ratio", 0.25), ("seed", 1), ("slow_mode_prob", 0.2), ("token_compressor", "pool")]:
        assert not bench.same_recipe({**saved, field: value}, config), field
    assert not bench.same_recipe({**saved, "keep_ratio": 2.0}, config)  # no longer a valid recipe


def test_quick_qwen2_vl_bench_trains_the_m_rope_model(bench, tmp_path):
    """`--preset bench-qwen2vl --quick` trains and scores the tiny Qwen2-VL (16 merged visual tokens at 64 px)."""
    report = bench.main(["--preset", "bench-qwen2vl", "--recipes", "dualspeed-divprune-0.25", *_common(tmp_path)])
    assert report["config"]["family"] == "qwen2_vl" and report["num_visual_tokens"] == 16
    for name in ("baseline", "dualspeed-divprune-0.25"):
        (run,) = report["runs"][name]
        assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["compressed_accuracy"] <= 1.0
    assert report["runs"]["dualspeed-divprune-0.25"][0]["trainer"] == "SparseMLLMTrainer"
    markdown = (tmp_path / "bench" / "accuracy-bench-qwen2vl-quick.md").read_text()
    assert "Tiny Qwen2-VL (Qwen2-VL tower 1 x 16, M-RoPE decoder 2 x 32)" in markdown
