"""The wheel holds the library only: no benchmark harness, no plotting dependency, and it imports without matplotlib."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Imports every module of the installed package (from the folder given as argv[1]) and fails if one pulls matplotlib.
IMPORT_ALL = """
import importlib, pkgutil, sys
# The editable install's finder would win over a plain path entry: hide it and put the target first.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, sys.argv[1])
import hf_sparse_mllm
assert hf_sparse_mllm.__file__.startswith(sys.argv[1]), hf_sparse_mllm.__file__
names = [m.name for m in pkgutil.walk_packages(hf_sparse_mllm.__path__, "hf_sparse_mllm.")]
for name in names:
    importlib.import_module(name)
    assert "matplotlib" not in sys.modules, f"importing {name} imports matplotlib"
print(len(names))
"""


@pytest.mark.slow
def test_wheel_has_no_harness_and_imports_without_matplotlib(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("hf_sparse_mllm", "benchmarks"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Offline: no build isolation (setuptools from this venv) and no index.
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist")]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("hf_sparse_mllm-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata).decode()
    assert names and all(n.startswith(("hf_sparse_mllm/", "hf_sparse_mllm-")) for n in names), names
    assert not [n for n in names if "benchmarks" in n or n.endswith("demo.py")]
    requirements = [line for line in metadata.splitlines() if line.startswith(("Requires-Dist:", "Provides-Extra:"))]
    assert requirements and not [line for line in requirements if "matplotlib" in line or line.endswith(": demo")]

    target = tmp_path / "target"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-c", IMPORT_ALL, str(target)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) > 10  # every module was imported, not an empty package
