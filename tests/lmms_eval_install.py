"""Install lmms-eval for the slow tests that run it, into a folder of their own and never into the venv.

`make install-lmms-eval LMMS_EVAL_TARGET=<folder>` installs lmms-eval and the modules it needs with `--no-deps`, so the
venv's CPU torch is never replaced; lmms-eval then runs in a subprocess with that folder on `PYTHONPATH`.
"""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install_lmms_eval(target: Path) -> str:
    """Install lmms-eval into `target` (an empty folder) and return its path for `PYTHONPATH`."""
    torch_before = version("torch")
    # `-o install`: the venv is already set up (the tests run inside it); do not reinstall it from here.
    subprocess.run(
        ["make", "-C", str(REPO), "-o", "install", "install-lmms-eval", f"LMMS_EVAL_TARGET={target}"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert version("torch") == torch_before
    installed = os.listdir(target)
    assert "lmms_eval" in installed and not {"torch", "torchvision"} & set(installed)
    return str(target)


def lmms_eval_env(lmms_eval_path: str) -> dict:
    """The environment of a subprocess that imports lmms-eval from `lmms_eval_path`, offline."""
    env = dict(os.environ)
    env.update(PYTHONPATH=lmms_eval_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env
