"""`make bench-accuracy` smoke path: recipes train, both evaluations are reported, and --resume keeps finished runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("_bench_accuracy", ROOT / "scripts" / "bench_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_bench_writes_results_and_resumes(tmp_path, capsys):
    bench = _bench_module()
    common = [
        "--quick",
        "--no-curve",
        "--no-progress",
        "--output",
        str(tmp_path / "bench"),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    common += ["--runs-dir", str(tmp_path / "runs")]
    threads = torch.get_num_threads()
    try:
        first = bench.main(["--recipes", "naive-divprune-0.25", *common])
        capsys.readouterr()
        second = bench.main(["--recipes", "naive-divprune-0.25,dualspeed-divprune-0.25", "--resume", *common])
        printed = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)

    saved = json.loads((tmp_path / "bench" / "accuracy-quick.json").read_text())
    assert set(saved["summary"]) == {"baseline", "naive-divprune-0.25", "dualspeed-divprune-0.25"}
    for name, summary in saved["summary"].items():
        assert 0.0 <= summary["full_accuracy_mean"] <= 1.0 and 0.0 <= summary["compressed_accuracy_mean"] <= 1.0
        assert summary["speedup"] > 0, name
    # The resumed invocation trained only the new recipe and kept the earlier runs as they were.
    assert "seed 0: baseline\n" not in printed and "seed 0: dualspeed-divprune-0.25\n" in printed
    assert second["runs"]["baseline"] == json.loads(json.dumps(first["runs"]["baseline"]))
    assert "| dualspeed-divprune-0.25 |" in (tmp_path / "bench" / "accuracy-quick.md").read_text()

    # Everything asked for is finished: nothing trains, the results are rewritten (here without the dropped recipe).
    third = bench.main(["--recipes", "dualspeed-divprune-0.25", "--resume", *common])
    printed = capsys.readouterr().out
    assert "[bench-accuracy] seed 0:" not in printed and "dropping the earlier runs of naive-divprune-0.25" in printed
    saved = json.loads((tmp_path / "bench" / "accuracy-quick.json").read_text())
    assert set(saved["summary"]) == set(third["summary"]) == {"baseline", "dualspeed-divprune-0.25"}
    assert saved["total_seconds"] >= second["total_seconds"]

    # Another configuration (here: more steps) is not mixed with the saved runs.
    bench.main(["--recipes", "baseline", "--steps", "4", "--resume", *common])
    assert "starting afresh" in capsys.readouterr().out
    torch.set_num_threads(threads)
