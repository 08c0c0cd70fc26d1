"""Hub contract (docs/hub.md): export, loading without this package, push flows, the recipe config, model cards.

Push tests never touch the network. The seam is the one Hub client `transformers` routes every upload through:
`transformers.utils.hub.hf_api()` returns the module-level `_hf_api`, and `Trainer.init_hf_repo`,
`Trainer.push_to_hub`, `Trainer._push_from_checkpoint`, `PushToHubMixin.push_to_hub` (`create_commit`) and our
`hf_sparse_mllm.hub`/`SparseMLLMConfig.push_to_hub` all call it. `FolderHub` replaces that object with an `HfApi`
whose repo-writing methods (`create_repo`, `create_branch`, `upload_folder`, `create_commit`) write into a folder; the
callers' file selection (the checkpoint copy list, `ignore_patterns=["_*", "checkpoint-*"]`) and `run_as_future`
threads stay the real code.
"""

from __future__ import annotations

import doctest
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from conftest import collate, make_dataset, tiny_llava, training_args
from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, RepoUrl
from huggingface_hub.hf_api import future_compatible
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, LlavaConfig

from hf_sparse_mllm import SPARSE_CONFIG_NAME, SparseMLLMConfig, SparseMLLMTrainer, __version__
from hf_sparse_mllm import hub as hub_module
from hf_sparse_mllm.compressors import get_compressor
from hf_sparse_mllm.data.collator import VisionLanguageCollator
from hf_sparse_mllm.hub import model_card_template_path, render_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(token_compressor="divprune", keep_ratio=0.25, slow_mode_prob=0.5, stage="instruction", seed=3)
EVAL = [
    EvalResult(
        task_type="visual-question-answering",
        dataset_type="synthetic-shapes-vqa",
        dataset_name="Synthetic shapes VQA",
        dataset_split="test",
        metric_type="exact_match",
        metric_value=0.75,
    )
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import time, before conftest sets it: force it for this module.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---- the Hub test double -------------------------------------------------------------------------------------------


class FolderHub(HfApi):
    """A Hub client that keeps each repo as a folder `root/<namespace>/<name>` and records every call."""

    def __init__(self, root: Path):
        super().__init__()  # default endpoint: only used to build URLs, nothing is requested
        self.root = root
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []

    @staticmethod
    def _resolved_token(token):
        # What the real client would authenticate with: an explicit token, else HF_TOKEN / the stored login.
        return token if isinstance(token, str) else huggingface_hub.get_token()

    def repo_files(self, repo_id: str) -> set[str]:
        folder = self.root / repo_id
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        repo_id = repo_id if "/" in repo_id else f"test-user/{repo_id}"
        if repo_id in self.repos and not exist_ok:
            raise ValueError(f"{repo_id} exists")
        self.repos.setdefault(repo_id, {"private": private, "token": self._resolved_token(token), "branches": set()})
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
        self.repos[repo_id]["branches"].add(branch)

    def _commit(self, repo_id, files: dict[str, bytes], message, token, revision) -> CommitInfo:
        if repo_id not in self.repos:
            raise ValueError(f"Repository {repo_id} was never created")
        for path_in_repo, content in files.items():
            target = self.root / repo_id / path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        oid = hashlib.sha1(f"{len(self.commits)}{message}".encode()).hexdigest()
        self.commits.append(
            {
                "repo_id": repo_id,
                "message": message,
                "files": set(files),
                "token": self._resolved_token(token),
                "revision": revision,
                "readme": files.get("README.md", b"").decode(),
            }
        )
        url = f"{self.endpoint}/{repo_id}/commit/{oid}"
        return CommitInfo(commit_url=url, commit_message=message, commit_description="", oid=oid)

    @future_compatible
    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        commit_message=None,
        commit_description=None,
        token=None,
        repo_type=None,
        revision=None,
        create_pr=None,
        parent_commit=None,
        allow_patterns=None,
        ignore_patterns=None,
        delete_patterns=None,
        run_as_future=False,
    ):
        folder = Path(folder_path)
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        relpaths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
        kept = filter_repo_objects(
            relpaths, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS
        )
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        files = {prefix + rel: (folder / rel).read_bytes() for rel in kept}
        return self._commit(repo_id, files, commit_message, token, revision)

    @future_compatible
    def create_commit(
        self, repo_id, operations, *, commit_message, token=None, revision=None, run_as_future=False, **kwargs
    ):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        return self._commit(repo_id, files, commit_message, token, revision)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", hub)
    monkeypatch.setenv("HF_TOKEN", "hf_token_from_env")
    return hub


# ---- helpers -----------------------------------------------------------------------------------------------------------


def _trainer(tmp_path, *, sparse=RECIPE, **arg_overrides):
    model, processor = tiny_llava()
    args = training_args(tmp_path, **arg_overrides)
    return SparseMLLMTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(8),
        data_collator=VisionLanguageCollator(processor),
        processing_class=processor,
        sparse_config=SparseMLLMConfig(**sparse),
    )


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def stock_files(tmp_path_factory):
    """What stock `save_pretrained` writes for the tiny model and its processor: the files every upload must carry."""
    folder = tmp_path_factory.mktemp("stock")
    model, processor = tiny_llava()
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "processor")
    return _listing(folder / "model"), _listing(folder / "processor")


def _expected_upload(stock_files, *extra: str) -> set[str]:
    model_files, processor_files = stock_files
    return model_files | processor_files | {SPARSE_CONFIG_NAME, "README.md", *extra}


# ---- SparseMLLMConfig on its own -----------------------------------------------------------------------------------


def test_sparse_config_saves_under_its_own_name_with_version(tmp_path):
    config = SparseMLLMConfig(**RECIPE)
    config.save_pretrained(tmp_path)
    assert _listing(tmp_path) == {SPARSE_CONFIG_NAME}
    saved = json.loads((tmp_path / SPARSE_CONFIG_NAME).read_text())
    assert saved["model_type"] == "sparse_mllm" and saved["sparse_mllm_version"] == __version__
    assert SparseMLLMConfig.from_pretrained(tmp_path).recipe_dict() == config.recipe_dict()
    assert SparseMLLMConfig.from_json_file(tmp_path / SPARSE_CONFIG_NAME).recipe_dict() == config.recipe_dict()
    assert isinstance(AutoConfig.for_model("sparse_mllm"), SparseMLLMConfig)


def test_sparse_config_drops_unknown_keys_from_newer_versions_with_warning(tmp_path, caplog):
    saved = {**SparseMLLMConfig(**RECIPE).to_dict(), "future_knob": 7, "sparse_mllm_version": "9.0.0"}
    (tmp_path / SPARSE_CONFIG_NAME).write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="hf_sparse_mllm"):
        loaded = SparseMLLMConfig.from_pretrained(tmp_path)
    assert not hasattr(loaded, "future_knob") and loaded.keep_ratio == RECIPE["keep_ratio"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "future_knob" in warning[0] and "9.0.0" in warning[0]


def test_sparse_config_from_hub_repo_id_downloads_only_its_file(tmp_path, fake_hub, monkeypatch):
    """A repo id resolves through `hf_hub_download(repo_id, "sparse_mllm_config.json")`, the one file it needs."""
    config = SparseMLLMConfig(**RECIPE)
    config.push_to_hub("org/recipe")
    cache = tmp_path / "cache"
    requested = []

    def download(repo_id, filename, *, cache_dir, **kwargs):
        # Stands in for the real download: serves the file from the FolderHub repo into the cache layout.
        requested.append((repo_id, filename))
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return shutil.copy(fake_hub.root / repo_id / filename, repo / "snapshots" / commit / filename)

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", download)
    loaded = SparseMLLMConfig.from_pretrained("org/recipe", cache_dir=cache)
    assert loaded.recipe_dict() == config.recipe_dict()
    assert requested == [("org/recipe", SPARSE_CONFIG_NAME)]


def test_sparse_config_falls_back_to_the_dict_in_config_json(tmp_path):
    config = SparseMLLMConfig(**RECIPE)
    model, _ = tiny_llava()
    model.config.sparse_mllm = config.recipe_dict()
    model.config.save_pretrained(tmp_path)
    assert SparseMLLMConfig.from_pretrained(tmp_path).recipe_dict() == config.recipe_dict()
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=SPARSE_CONFIG_NAME):
        SparseMLLMConfig.from_pretrained(tmp_path / "empty")


def test_sparse_config_push_to_hub_uploads_only_its_file(tmp_path, fake_hub):
    config = SparseMLLMConfig(**RECIPE)
    config.push_to_hub("org/recipe", private=True)
    assert fake_hub.repo_files("org/recipe") == {SPARSE_CONFIG_NAME}
    assert fake_hub.repos["org/recipe"] == {"private": True, "token": "hf_token_from_env", "branches": set()}
    pushed = json.loads((fake_hub.root / "org/recipe" / SPARSE_CONFIG_NAME).read_text())
    assert pushed == json.loads(config.to_json_string())

    config.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="org/recipe-2", token="hf_explicit")
    assert _listing(tmp_path / "local") == {SPARSE_CONFIG_NAME}  # never a config.json
    assert fake_hub.repo_files("org/recipe-2") == {SPARSE_CONFIG_NAME}
    assert fake_hub.commits[-1]["token"] == "hf_explicit"

    config.push_to_hub("org/recipe", revision="dev", commit_message="Recipe v2", max_shard_size="1GB")
    assert fake_hub.repos["org/recipe"]["branches"] == {"dev"}
    assert fake_hub.commits[-1]["revision"] == "dev" and fake_hub.commits[-1]["message"] == "Recipe v2"
    with pytest.raises(TypeError, match="'privte' \\(did you mean 'private'\\?\\)"):
        config.push_to_hub("org/recipe-3", privte=True)
    assert "org/recipe-3" not in fake_hub.repos


# ---- export and loading without this package ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A DualSpeed-trained tiny LLaVA (isolator attached), exported with `save_model`, plus its full-mode logits."""
    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    trainer = _trainer(root, max_steps=3)
    trainer.train()
    assert "sparse_mllm_isolator.tokens" in dict(trainer.model.named_parameters())
    export = root / "export"
    trainer.save_model(str(export))

    model, processor = trainer.model, trainer.processing_class
    batch = dict(collate(processor, make_dataset(3)))
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    text = "<image> what color is the object ?"
    processed = dict(processor(text=[text], images=[Image.new("RGB", (32, 32), (220, 30, 30))], return_tensors="pt"))
    torch.save({"batch": batch, "logits": logits, "text": text, "processed": processed}, root / "batch.pt")
    return trainer, export, root / "batch.pt"


def test_export_keeps_base_config_weights_and_records_recipe(exported, tmp_path):
    trainer, export, _ = exported
    config_json = json.loads((export / "config.json").read_text())
    assert config_json["model_type"] == "llava"
    assert config_json["sparse_mllm"] == trainer.sparse_config.recipe_dict()
    assert config_json["sparse_mllm"]["sparse_mllm_version"] == __version__
    assert type(AutoConfig.from_pretrained(export)) is LlavaConfig
    assert SparseMLLMConfig.from_pretrained(export).recipe_dict() == SparseMLLMConfig(**RECIPE).recipe_dict()

    fresh, _ = tiny_llava()
    fresh.save_pretrained(tmp_path / "fresh")
    with safe_open(tmp_path / "fresh" / "model.safetensors", "pt") as f:
        fresh_keys = set(f.keys())
    with safe_open(export / "model.safetensors", "pt") as f:
        assert set(f.keys()) == fresh_keys
    assert not any("isolator" in name for name in os.listdir(export))
    card = ModelCard.load(export / "README.md")
    assert card.data.sparse_mllm == trainer.sparse_config.recipe_dict()


# Runs in a fresh interpreter whose `sitecustomize` hides hf_sparse_mllm (it is installed editable in the venv).
BLOCK_PACKAGE = """
import sys


class _WithoutSparseMLLM:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_sparse_mllm" or name.startswith("hf_sparse_mllm."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, _WithoutSparseMLLM())
"""

LOAD_WITHOUT_PACKAGE = """
import json, logging, sys, warnings
try:
    import hf_sparse_mllm
    raise SystemExit(f"hf_sparse_mllm is importable from {hf_sparse_mllm.__file__}")
except ImportError:
    pass
import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from PIL import Image

export, batch_file, out_file = sys.argv[1:]
messages = []


class Collect(logging.Handler):
    def emit(self, record):
        messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")


transformers.logging.set_verbosity_warning()
transformers.logging.get_logger().addHandler(Collect(level=logging.WARNING))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    config = AutoConfig.from_pretrained(export)
    model, info = AutoModelForImageTextToText.from_pretrained(export, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(export)
saved = torch.load(batch_file)
model.eval()
with torch.no_grad():
    logits = model(**saved["batch"]).logits
image = Image.new("RGB", (32, 32), (220, 30, 30))
processed = dict(processor(text=[saved["text"]], images=[image], return_tensors="pt"))
torch.save({"logits": logits, "processed": processed}, out_file)
print(json.dumps({
    "config_class": type(config).__name__,
    "model_class": type(model).__name__,
    "processor_class": type(processor).__name__,
    "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
    "log": messages,
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "sparse_modules": sorted(m for m in sys.modules if m.startswith("hf_sparse_mllm")),
    "recipe_on_config": getattr(model.config, "sparse_mllm", None),
}))
"""


def test_export_loads_without_this_package(exported, tmp_path):
    trainer, export, batch_file = exported
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_PACKAGE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    out_file = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(export), str(batch_file), str(out_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sparse_modules"] == []
    assert (report["config_class"], report["model_class"]) == ("LlavaConfig", "LlavaForConditionalGeneration")
    assert report["processor_class"] == "LlavaProcessor"
    assert report["loading_info"] == {k: [] for k in report["loading_info"]}, report["loading_info"]
    assert report["log"] == [], report["log"]  # no missing/unexpected keys, nothing about the `sparse_mllm` entry
    assert report["warnings"] == [], report["warnings"]
    assert report["recipe_on_config"] == trainer.sparse_config.recipe_dict()

    theirs, ours = torch.load(out_file), torch.load(batch_file)
    torch.testing.assert_close(theirs["logits"], ours["logits"], atol=1e-5, rtol=0)
    assert theirs["processed"].keys() == ours["processed"].keys()
    for key, value in ours["processed"].items():
        torch.testing.assert_close(theirs["processed"][key], value, msg=key)


# ---- pushing -----------------------------------------------------------------------------------------------------------


def test_trainer_push_to_hub_uploads_weights_configs_processor_and_card(tmp_path, fake_hub, stock_files):
    trainer = _trainer(
        tmp_path, hub_model_id="org/sparse-llava", hub_private_repo=True, save_strategy="steps", save_steps=1
    )
    trainer.train()
    assert fake_hub.commits == []  # push_to_hub=False: checkpoints are not pushed
    trainer.push_to_hub(speedup=1.8, eval_results=EVAL, dataset_tags="org/shapes-vqa")

    assert fake_hub.repos["org/sparse-llava"]["private"] is True
    (commit,) = fake_hub.commits
    assert commit["message"] == "End of training" and commit["token"] == "hf_token_from_env"
    assert commit["files"] == _expected_upload(stock_files, "training_args.bin")  # no checkpoint-*, no _* files
    repo = fake_hub.root / "org/sparse-llava"
    assert SparseMLLMConfig.from_pretrained(repo).recipe_dict() == trainer.sparse_config.recipe_dict()
    assert json.loads((repo / "config.json").read_text())["sparse_mllm"] == trainer.sparse_config.recipe_dict()
    card = ModelCard.load(repo / "README.md")
    assert card.data.sparse_mllm_training_speedup == 1.8 and card.data.datasets == ["org/shapes-vqa"]
    assert card.data.eval_results[0].metric_value == 0.75
    assert 'from_pretrained("org/sparse-llava")' in card.text


def test_trainer_every_save_pushes_recipe_and_card_with_each_checkpoint(tmp_path, fake_hub, stock_files):
    trainer = _trainer(
        tmp_path,
        push_to_hub=True,
        hub_model_id="org/every-save",
        hub_strategy="every_save",
        hub_always_push=True,  # push every checkpoint even if the previous upload is still running
        save_strategy="steps",
        save_steps=1,
    )
    trainer.create_model_card(speedup=2.5)  # remembered for the cards of later checkpoints
    trainer.train()
    trainer._finish_current_push()

    steps = [c for c in fake_hub.commits if c["message"].startswith("Training in progress")]
    assert [c["message"] for c in steps] == ["Training in progress, step 1", "Training in progress, step 2"]
    for commit in steps:
        # Stock `_push_from_checkpoint` copies only weights and config.json from the checkpoint.
        assert commit["files"] == _expected_upload(stock_files, "training_args.bin"), commit["message"]
        assert "sparse_mllm:" in commit["readme"] and "sparse_mllm_training_speedup: 2.5" in commit["readme"]
    assert fake_hub.repos["org/every-save"]["token"] == "hf_token_from_env"

    trainer.push_to_hub(eval_results=EVAL)
    final = fake_hub.commits[-1]
    assert final["message"] == "End of training"
    assert final["files"] == _expected_upload(stock_files, "training_args.bin")
    card = ModelCard.load(fake_hub.root / "org/every-save" / "README.md")
    assert card.data.sparse_mllm_training_speedup == 2.5 and card.data.eval_results[0].metric_type == "exact_match"
    assert fake_hub.repo_files("org/every-save") == final["files"]


def test_model_push_to_hub_after_training_uploads_both_configs_processor_and_card(tmp_path, fake_hub, stock_files):
    trainer = _trainer(tmp_path)
    trainer.train()
    trainer.save_model()
    trainer.model.push_to_hub("org/model-only", private=True)

    (commit,) = fake_hub.commits
    assert commit["files"] == _expected_upload(stock_files)
    assert fake_hub.repos["org/model-only"]["private"] is True and commit["token"] == "hf_token_from_env"
    repo = fake_hub.root / "org/model-only"
    assert SparseMLLMConfig.from_pretrained(repo).recipe_dict() == trainer.sparse_config.recipe_dict()
    card = ModelCard.load(repo / "README.md")
    assert card.data.model_name == "model-only" and 'from_pretrained("org/model-only")' in card.text
    assert "hf-sparse-mllm" in trainer.model.model_tags


# ---- model cards ---------------------------------------------------------------------------------------------------------


def test_model_card_parses_with_model_index_and_recipe(tmp_path):
    config = SparseMLLMConfig(**RECIPE)
    card = render_model_card(
        config,
        model_name="sparse-llava",
        repo_id="org/sparse-llava",
        base_model="llava-hf/llava-1.5-7b-hf",
        datasets=["org/shapes-vqa"],
        samples_per_second=30.0,
        baseline_samples_per_second=12.0,
        eval_results=[{**vars(EVAL[0])}],
        license="apache-2.0",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.model_name == "sparse-llava" and data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert {"hf-sparse-mllm", "sparse-training"} <= set(data.tags)
    assert data.sparse_mllm == config.recipe_dict() and data.sparse_mllm_training_speedup == 2.5
    assert data.to_dict()["model-index"][0]["results"][0]["metrics"][0] == {"type": "exact_match", "value": 0.75}
    (result,) = data.eval_results
    assert (result.dataset_name, result.metric_value) == ("Synthetic shapes VQA", 0.75)
    text = loaded.text
    assert "`divprune` keeps 25 % of each image's visual tokens" in text
    assert "50 % of the optimizer steps are slow steps" in text
    assert "**2.50x**" in text and "| Synthetic shapes VQA | test | exact_match | 0.75 |" in text
    assert 'AutoModelForImageTextToText.from_pretrained("org/sparse-llava")' in text


def test_model_card_without_measurements_says_so():
    card = render_model_card(SparseMLLMConfig(token_compressor=None, slow_mode_prob=0.0), model_name="m")
    assert "Not measured." in card.text and "No evaluation results were recorded." in card.text
    assert "Visual token compression: off" in card.text
    assert "model-index" not in card.data.to_dict()


@pytest.mark.parametrize("skip_on_slow_steps", [False, True])
def test_model_card_describes_layer_skipping(skip_on_slow_steps):
    recipe = SparseMLLMConfig(layer_skip_policy="stochastic", max_skip_prob=0.5, skip_on_slow_steps=skip_on_slow_steps)
    text = render_model_card(recipe, model_name="m").text
    assert "`stochastic` policy (skip probability rising linearly with depth up to 0.5)" in text
    assert ("slow steps skip layers too" in text) == skip_on_slow_steps
    assert ("slow steps run every layer" in text) != skip_on_slow_steps


@pytest.mark.parametrize("keep_ratio", [0.05, 0.1, 0.25, 0.3, 0.5])
def test_model_card_describes_the_pool_budget_by_its_stride(keep_ratio):
    """`pool` keeps ceil(rows / s) * ceil(cols / s) tokens for a stride s, not round(keep_ratio * N): the card says so."""
    text = render_model_card(SparseMLLMConfig(token_compressor="pool", keep_ratio=keep_ratio), model_name="m").text
    stride = int(re.search(rf"s = max\(1, round\(sqrt\(1 / {keep_ratio}\)\)\) = (\d+)", text).group(1))
    for rows, cols in [(24, 24), (5, 7)]:
        budget = get_compressor("pool").budget(rows * cols, keep_ratio, grid_size=(rows, cols))
        assert budget == math.ceil(rows / stride) * math.ceil(cols / stride)
    if stride == 1:
        assert "`pool` keeps every visual token" in text
    else:
        assert f"`pool` averages each {stride}x{stride} window" in text
        assert f"ceil(rows / {stride}) * ceil(cols / {stride}) tokens" in text
    assert f"round({keep_ratio} N)" not in text


def test_model_card_template_ships_inside_the_package():
    path = model_card_template_path()
    assert path.is_file() and path.parent == Path(hub_module.__file__).parent / "templates"


def test_docstring_examples():
    class FencedParser(doctest.DocTestParser):
        """Ignore the ```python fences around HF-style examples."""

        def parse(self, string, name="<string>"):
            return super().parse(re.sub(r"(?m)^[ \t]*```.*$", "", string), name)

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(parser=FencedParser()).find(hub_module):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0


def test_rendered_example_card_is_current():
    """`model_cards/example.md` is what `model_cards/render_example.py` writes with this version of the template."""
    script = REPO_ROOT / "model_cards" / "render_example.py"
    namespace: dict = {}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    expected = str(namespace["example_card"]())
    assert (REPO_ROOT / "model_cards" / "example.md").read_text() == expected, (
        "run python model_cards/render_example.py"
    )


CARD_AFTER_INSTALL = """
import sys
import hf_sparse_mllm
from hf_sparse_mllm import SparseMLLMConfig
from hf_sparse_mllm.hub import model_card_template_path, render_model_card
from huggingface_hub import ModelCard
target, out = sys.argv[1:]
assert hf_sparse_mllm.__file__.startswith(target), hf_sparse_mllm.__file__
assert str(model_card_template_path()).startswith(target), model_card_template_path()
card = render_model_card(
    SparseMLLMConfig(keep_ratio=0.1), model_name="m", eval_results=[dict(task_type="vqa", dataset_type="d",
    dataset_name="D", metric_type="acc", metric_value=0.5)],
)
card.save(out)
print(hf_sparse_mllm.__file__)
"""


@pytest.mark.slow
def test_model_card_renders_after_non_editable_install(tmp_path):
    """Build a wheel from a copy of the sources, install it into a target folder, render a card from there."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT / "hf_sparse_mllm", source / "hf_sparse_mllm", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Offline: no build isolation (setuptools from this venv) and no index.
    build = [
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        str(tmp_path / "dist"),
        str(source),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("hf_sparse_mllm-*.whl")
    target = tmp_path / "target"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "hf_sparse_mllm" / "templates" / "model_card.md").is_file()

    site = tmp_path / "site"
    site.mkdir()
    # The editable install's finder would win over a plain path entry: put the target first and hide the repo.
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        f"sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    out = tmp_path / "README.md"
    result = subprocess.run(
        [sys.executable, "-c", CARD_AFTER_INSTALL, str(target), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(target))
    card = ModelCard.load(out)
    assert card.data.sparse_mllm["keep_ratio"] == 0.1 and card.data.eval_results[0].metric_value == 0.5
    assert "`divprune` keeps 10 % of each image's visual tokens" in card.text
