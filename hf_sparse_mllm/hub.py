"""Publishing sparse-trained models: export, `push_to_hub` and model cards.

A sparse-trained checkpoint is an ordinary `transformers` checkpoint (base `model_type`, base parameter names, no
mode isolator) plus two records of how it was trained: `sparse_mllm_config.json` and a plain `sparse_mllm` dict in
`config.json`. Its model card is rendered from `templates/model_card.md`, which ships inside the package, with
`huggingface_hub.ModelCard`.

Every upload goes through `transformers.utils.hub.hf_api()`, the Hub client `Trainer.push_to_hub` and
`PreTrainedModel.push_to_hub` use, so tokens (`HF_TOKEN`, `hf auth login`), endpoints and test doubles apply alike.

```python
>>> from hf_sparse_mllm import SparseMLLMConfig
>>> from hf_sparse_mllm.hub import render_model_card
>>> card = render_model_card(SparseMLLMConfig(keep_ratio=0.1), model_name="my-llava", model_type="llava")
>>> card.data.tags[:2]
['hf-sparse-mllm', 'sparse-training']
```
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel
from transformers.utils.hub import hf_api

from .compressors import get_compressor
from .config import SPARSE_CONFIG_NAME, SparseMLLMConfig
from .skipping import get_skip_policy

MODEL_CARD_NAME = "README.md"
MODEL_CARD_TEMPLATE = "model_card.md"
SPARSE_TAGS = ("hf-sparse-mllm", "sparse-training")
# Written by the trainer next to the weights and copied into the upload folder before each checkpoint push.
SPARSE_EXPORT_FILES = (SPARSE_CONFIG_NAME, MODEL_CARD_NAME)


def model_card_template_path() -> Path:
    """Path of the model card template shipped inside the installed package."""
    return Path(str(files("hf_sparse_mllm") / "templates" / MODEL_CARD_TEMPLATE))


# ---- the recipe in words -------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:g} %"


def describe_recipe(recipe: SparseMLLMConfig | Mapping[str, Any]) -> list[str]:
    """One sentence per component of the recipe, for people reading the model card.

    The compression budget is worded by the compressor (`TokenCompressor.describe_budget`) and the layer-skip settings
    by the skip policy (`SkipPolicy.describe`), so a registered plug-in describes itself.

    Args:
        recipe ([`SparseMLLMConfig`] or `dict`):
            The recipe, or its `recipe_dict()` (as stored in `config.json`; keys this version does not know are
            ignored with a warning, missing keys take the defaults).

    Returns:
        `list[str]`: Markdown sentences.
    """
    config = recipe if isinstance(recipe, SparseMLLMConfig) else SparseMLLMConfig.from_dict(recipe)
    lines = []
    if config.token_compressor is None:
        lines.append("Visual token compression: off (every visual token reaches the language model).")
    else:
        budget = get_compressor(config.token_compressor).describe_budget(config.keep_ratio, config.num_keep)
        lines.append(f"Visual token compression (fast steps): `{config.token_compressor}` {budget}.")
        if config.num_isolator_tokens:
            lines.append(
                f"Mode isolator: {config.num_isolator_tokens} learnable tokens precede each image's kept tokens on "
                "fast steps; they are training state only and are not in this checkpoint."
            )
        if config.slow_mode_prob:
            lines.append(
                "Fast/slow alternation (DualSpeed): in the instruction stage "
                f"{_percent(config.slow_mode_prob)} of the optimizer steps are slow steps with all visual tokens, "
                f"distilled from the fast mode (KL weight {config.distill_weight}, temperature "
                f"{config.distill_temperature})."
            )
        else:
            lines.append("Fast/slow alternation: off (every step is a fast step).")
    if config.layer_skip_policy is not None:
        lines.append(_describe_layer_skipping(config))
    stage_text = {
        "alignment": "alignment (projector training; fast steps only)",
        "instruction": "instruction tuning",
        "auto": "chosen automatically (alignment when the language model is frozen, instruction tuning otherwise)",
    }[config.stage]
    lines.append(f"Training stage: {stage_text}.")
    lines.append(f"Seed of every sparse decision: {config.seed} (reproducible across processes and resumes).")
    if config.resume_note:
        lines.append(f"The recipe changed when training resumed: {config.resume_note}.")
    return lines


def _describe_layer_skipping(config: SparseMLLMConfig) -> str:
    policy = get_skip_policy(config.layer_skip_policy)
    parts = [f"`{policy.name}` policy ({policy.describe(**config.skip_policy_fields())})"]
    if "protect_layers" in policy.fields:  # the rule every policy that reads protect_layers follows
        protect = config.protect_layers
        parts.append(
            {0: "no layer is protected", 1: "the first and the last decoder layer always run"}.get(
                protect, f"the first and last {protect} decoder layers always run"
            )
        )
    parts.append("a skipped layer is not executed on that step (no forward, no activations, no gradient)")
    parts.append("slow steps skip layers too." if config.skip_on_slow_steps else "slow steps run every layer.")
    when = " in the instruction stage" if config.stage_aware else ""
    return f"Layer skipping{when}: " + "; ".join(parts)


# ---- model cards -----------------------------------------------------------------------------------------------------


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    return values or None


def _as_eval_result(result: EvalResult | Mapping[str, Any]) -> EvalResult:
    return result if isinstance(result, EvalResult) else EvalResult(**result)


def render_model_card(
    recipe: SparseMLLMConfig | Mapping[str, Any],
    *,
    model_name: str,
    repo_id: str | None = None,
    model_type: str = "llava",
    base_model: str | None = None,
    datasets: str | Iterable[str] | None = None,
    speedup: float | None = None,
    samples_per_second: float | None = None,
    baseline_samples_per_second: float | None = None,
    eval_results: Iterable[EvalResult | Mapping[str, Any]] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: str | Iterable[str] | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    r"""
    Render the model card of a sparse-trained model from the template shipped with the package.

    Args:
        recipe ([`SparseMLLMConfig`] or `dict`):
            The recipe the model was trained with; written in words and, under `sparse_mllm`, in the card metadata.
        model_name (`str`):
            The model's name (the `model-index` name).
        repo_id (`str`, *optional*):
            The Hub repo id (or path) used in the loading snippet. Defaults to `model_name`.
        model_type (`str`, *optional*, defaults to `"llava"`):
            The base `model_type` of the checkpoint.
        base_model (`str`, *optional*):
            Hub id of the model this one was fine-tuned from.
        datasets (`str` or `list[str]`, *optional*):
            Hub ids of the training datasets.
        speedup (`float`, *optional*):
            Measured training speed-up over dense training. Computed from `samples_per_second /
            baseline_samples_per_second` when not given and both are known.
        samples_per_second (`float`, *optional*):
            Measured training throughput of the sparse run.
        baseline_samples_per_second (`float`, *optional*):
            Measured training throughput of dense training on the same hardware.
        eval_results (`list[EvalResult]` or `list[dict]`, *optional*):
            Evaluation results (`huggingface_hub.EvalResult` or its keyword arguments), written as `model-index`.
        license (`str`, *optional*), language (`str` or `list[str]`, *optional*), tags (`list[str]`, *optional*):
            Card metadata; `hf-sparse-mllm` and `sparse-training` are always among the tags.
        template_path (`str`, *optional*):
            A different Jinja template; defaults to [`model_card_template_path`].

    Returns:
        [`~huggingface_hub.ModelCard`]: the card; `card.save(path)` writes it, `card.push_to_hub(repo_id)` uploads it.
    """
    config = recipe if isinstance(recipe, SparseMLLMConfig) else SparseMLLMConfig.from_dict(dict(recipe))
    recipe_dict = config.recipe_dict()
    results = [_as_eval_result(r) for r in eval_results] if eval_results else None
    if speedup is None and samples_per_second and baseline_samples_per_second:
        speedup = samples_per_second / baseline_samples_per_second
    tag_list = list(SPARSE_TAGS)
    for tag in _as_list(tags) or []:
        if tag not in tag_list:
            tag_list.append(tag)
    dataset_list = _as_list(datasets)
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_list,
        eval_results=results,
        language=language,
        library_name="transformers",
        license=license,
        model_name=model_name,
        pipeline_tag="image-text-to-text",
        tags=tag_list,
        sparse_mllm=recipe_dict,
        sparse_mllm_training_speedup=round(float(speedup), 4) if speedup is not None else None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or model_card_template_path()),
        model_name=model_name,
        repo_id=repo_id or model_name,
        model_type=model_type,
        dataset_list=dataset_list,
        recipe_lines=describe_recipe(config),
        recipe_json=json.dumps({"model_type": config.model_type, **recipe_dict}, indent=2, sort_keys=True),
        sparse_mllm_version=config.sparse_mllm_version,
        layer_skipping=recipe_dict.get("layer_skip_policy") is not None,
        speedup=speedup,
        samples_per_second=samples_per_second,
        baseline_samples_per_second=baseline_samples_per_second,
        eval_results=results,
    )


def _base_model_id(model) -> str | None:
    """The Hub id the model was loaded from, if any (a local path or a model built from a config has none)."""
    name = getattr(model.config, "_name_or_path", "") or ""
    if not name or os.path.isdir(name) or name.count("/") != 1:
        return None
    return name


def _measured_throughput(log_history: list[dict]) -> float | None:
    """Training samples/s of the run: the Trainer's end-of-training figure, else the mean of the sparse logs."""
    for entry in reversed(log_history):
        if "train_samples_per_second" in entry:
            return float(entry["train_samples_per_second"])
    values = [e["sparse/samples_per_second"] for e in log_history if "sparse/samples_per_second" in e]
    return sum(values) / len(values) if values else None


def trainer_model_card_kwargs(trainer, **overrides) -> dict[str, Any]:
    """Keyword arguments of [`render_model_card`] for what `trainer` trained; `overrides` win over what is inferred.

    Inferred: the model name and repo id (as `Trainer.push_to_hub` names them), the base `model_type`, the base model
    (when the model was loaded from a Hub id) and the measured throughput (from `trainer.state.log_history`).
    """
    args = trainer.args
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    model_name = repo_id.split("/")[-1] if repo_id else Path(args.output_dir).name
    kwargs = {
        "model_name": model_name,
        "repo_id": repo_id or model_name,
        "model_type": trainer.model.config.model_type,
        "base_model": _base_model_id(trainer.model),
        "samples_per_second": _measured_throughput(trainer.state.log_history),
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def trainer_model_card(trainer, **overrides) -> ModelCard:
    """[`render_model_card`] for what `trainer` trained (see [`trainer_model_card_kwargs`])."""
    return render_model_card(trainer.sparse_config, **trainer_model_card_kwargs(trainer, **overrides))


# ---- files and uploads -----------------------------------------------------------------------------------------------


def copy_sparse_files(source_dir: str | os.PathLike, target_dir: str | os.PathLike) -> list[str]:
    """Copy `sparse_mllm_config.json` and `README.md` from `source_dir` (a checkpoint) to `target_dir`, if present."""
    copied = []
    for name in SPARSE_EXPORT_FILES:
        source = os.path.join(source_dir, name)
        if os.path.isfile(source):
            os.makedirs(target_dir, exist_ok=True)
            shutil.copy(source, os.path.join(target_dir, name))
            copied.append(name)
    return copied


def save_pretrained(
    model,
    save_directory: str | os.PathLike,
    *,
    sparse_config: SparseMLLMConfig | None = None,
    processor=None,
    card: ModelCard | None = None,
    **save_kwargs,
) -> None:
    """Export a sparse-trained model: weights and `config.json` (with the `sparse_mllm` dict), `sparse_mllm_config.json`,
    the processor and the model card.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The trained model (the mode isolator, if attached, removes itself from the weights).
        save_directory (`str`):
            Where to write.
        sparse_config ([`SparseMLLMConfig`], *optional*):
            The recipe. Defaults to the one recorded in `model.config.sparse_mllm`.
        processor (*optional*):
            A processor or tokenizer to save alongside.
        card ([`~huggingface_hub.ModelCard`], *optional*):
            The card to write as `README.md`. Defaults to [`render_model_card`] with what the model knows.
        save_kwargs:
            Passed to `model.save_pretrained`.
    """
    sparse_config = sparse_config if sparse_config is not None else recipe_of(model)
    model.config.sparse_mllm = sparse_config.recipe_dict()
    model.save_pretrained(save_directory, **save_kwargs)
    sparse_config.save_pretrained(save_directory)
    if processor is not None:
        processor.save_pretrained(save_directory)
    if card is None:
        name = Path(save_directory).name
        card = render_model_card(
            sparse_config, model_name=name, model_type=model.config.model_type, base_model=_base_model_id(model)
        )
    card.save(os.path.join(save_directory, MODEL_CARD_NAME))


def recipe_of(model) -> SparseMLLMConfig:
    """The [`SparseMLLMConfig`] recorded on `model.config.sparse_mllm` by [`SparseMLLMTrainer`]."""
    recipe = getattr(model.config, "sparse_mllm", None)
    if not recipe:
        raise ValueError(
            "model.config has no `sparse_mllm` recipe: pass `sparse_config=`, or save the model with SparseMLLMTrainer."
        )
    return SparseMLLMConfig.from_dict(dict(recipe))


def push_to_hub(
    model,
    repo_id: str,
    *,
    sparse_config: SparseMLLMConfig | None = None,
    processor=None,
    card_kwargs: Mapping[str, Any] | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
):
    r"""
    Upload a sparse-trained model in one commit: weights, `config.json`, `sparse_mllm_config.json`, the processor (if
    given) and the model card. The arguments after `card_kwargs` are those of `PreTrainedModel.push_to_hub`.

    [`SparseMLLMTrainer`] binds this function to the model it saves, so a plain `model.push_to_hub(repo_id)` after
    training uploads all of the above (the stock method uploads neither our config nor our card).

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The trained model.
        repo_id (`str`):
            The repo to push to (created if missing; `private` applies then).
        sparse_config ([`SparseMLLMConfig`], *optional*):
            The recipe. Defaults to the one recorded in `model.config.sparse_mllm`.
        processor (*optional*):
            A processor or tokenizer to upload alongside.
        card_kwargs (`dict`, *optional*):
            Keyword arguments of [`render_model_card`] (`model_name` and `repo_id` default to the target repo).

    Returns:
        [`~huggingface_hub.CommitInfo`]: the commit.
    """
    api = hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    sparse_config = sparse_config if sparse_config is not None else recipe_of(model)
    card_args = {"model_type": model.config.model_type, "base_model": _base_model_id(model), **(card_kwargs or {})}
    card_args.update(model_name=repo_id.split("/")[-1], repo_id=repo_id)
    card_args["tags"] = [*(_as_list(card_args.get("tags")) or []), *(tags or []), *(model.model_tags or [])]
    card = render_model_card(sparse_config, **card_args)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(
            model, folder, sparse_config=sparse_config, processor=processor, card=card, max_shard_size=max_shard_size
        )
        if revision is not None and not create_pr:
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload sparse-trained model",
            commit_description=commit_description,
            token=token,
            revision=None if create_pr else revision,
            create_pr=create_pr,
        )


def bind_push_to_hub(model, sparse_config: SparseMLLMConfig, *, processor=None, card_kwargs=None) -> None:
    """Make `model.push_to_hub(repo_id, ...)` upload the recipe, the processor and our model card too.

    Sets an instance attribute (a `functools.partial` of [`push_to_hub`]), so it survives `copy.deepcopy` and pickling
    and leaves the class untouched. Also tags the model (`model.add_model_tags`).
    """
    model.config.sparse_mllm = sparse_config.recipe_dict()
    if not isinstance(model, PreTrainedModel):
        return
    model.add_model_tags(list(SPARSE_TAGS))
    model.push_to_hub = functools.partial(
        push_to_hub, model, sparse_config=sparse_config, processor=processor, card_kwargs=dict(card_kwargs or {})
    )
