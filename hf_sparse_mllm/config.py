"""`SparseMLLMConfig`: the sparse-training recipe, saved next to the model under its own file name.

Each field's type, range and allowed names are declared once, in its annotation (for example
`Annotated[float, Interval("(0, 1]")]`). Construction checks and converts every value from that declaration, so
Python, YAML and command-line values follow the same rules, and `transformers.HfArgumentParser(SparseMLLMConfig)` turns
each field into a flag with its help string.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import operator
import os
import re
import tempfile
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from transformers.utils.hub import PushToHubMixin, cached_file

from ._names import did_you_mean
from ._version import __version__
from .compressors import list_compressors
from .skipping import get_skip_policy, list_skip_policies

logger = logging.getLogger(__name__)

SPARSE_CONFIG_NAME = "sparse_mllm_config.json"
# The fields that configure skip policies. Not derived from the registered policies' `fields`: a policy may also read
# a field of another component (a plug-in could read `seed`), which must not be reported as ignored when another
# policy is chosen. Every built-in policy reads only fields from this tuple (tested).
_SKIP_FIELDS = ("skip_ratio", "max_skip_prob", "protect_layers", "measure_every", "skip_layers")
# The string forms of booleans that `transformers.HfArgumentParser` accepts for a `bool` flag (YAML 1.1 loaders read
# yes/no as booleans too), accepted in Python as well so that a value means the same wherever it is written.
_TRUE_STRINGS = ("true", "yes", "t", "y", "1")
_FALSE_STRINGS = ("false", "no", "f", "n", "0")
_NONE_STRINGS = ("none", "null")


# ---- how a field's values are declared ------------------------------------------------------------------------------


class Interval:
    """The numbers a field accepts, in interval notation (`inf` for no upper bound).

    Example:

    ```python
    >>> from hf_sparse_mllm.config import Interval
    >>> 0.5 in Interval("(0, 1]"), 0 in Interval("(0, 1]"), str(Interval("(0, 1]")), str(Interval("[1, inf)"))
    (True, False, 'in (0, 1]', '>= 1')

    ```
    """

    def __init__(self, notation: str):
        low, high = notation[1:-1].split(",")
        self.notation = notation
        self.low, self.high = float(low), float(high)
        self.closed_low, self.closed_high = notation[0] == "[", notation[-1] == "]"

    def __contains__(self, value) -> bool:
        above = self.low < value or (self.closed_low and value == self.low)
        below = value < self.high or (self.closed_high and value == self.high)
        return above and below  # False for NaN

    def __str__(self) -> str:
        if self.high == float("inf"):
            return f"{'>=' if self.closed_low else '>'} {self.notation[1:].split(',')[0].strip()}"
        return f"in {self.notation}"


class OneOf:
    """The strings a field accepts: the names a registry holds when the value is checked (plug-ins register later
    than this module is imported)."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self.names = names


class _FieldMetadata(Mapping):
    """Field metadata whose `help` may be a function, called whenever it is read: `HfArgumentParser` reads it when it
    builds the parser, so the help of `token_compressor` lists the compressors registered at that time."""

    def __init__(self, help: str | Callable[[], str]):
        self._items = {"help": help}

    def __getitem__(self, key: str) -> Any:
        value = self._items[key]
        return value() if callable(value) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> dict:
        # TRL's parser copies field metadata: the copy is read now, as the parser reads it.
        return dict(self)


def _option(default, help: str | Callable[[], str]):
    return field(default=default, metadata=_FieldMetadata(help))


def _names(values: Iterable[str]) -> str:
    return ", ".join(values) or "none registered"


def _read_by(name: str) -> str:
    """Which registered skip policies read field `name`, for its help."""
    readers = [policy for policy in list_skip_policies() if name in get_skip_policy(policy).fields]
    if len(readers) > 1:
        return f"read by the {', '.join(readers[:-1])} and {readers[-1]} skip policies"
    return f"read by the {readers[0]} skip policy" if readers else "read by no registered skip policy"


# ---- the configuration -----------------------------------------------------------------------------------------------


def _suggest_fields_for_unknown_arguments(cls):
    """Class decorator: an unknown keyword argument is a `TypeError` that suggests the closest field (the dataclass
    `__init__` rejects it too, but without saying which field was meant)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        own = [f.name for f in fields(cls)]
        unknown = [key for key in kwargs if key not in own]
        if unknown:
            raise TypeError(
                f"{cls.__name__} got unexpected keyword arguments {did_you_mean(unknown, own)}. Fields: {own}."
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


# `from_pretrained`'s keyword arguments for `cached_file`; the others are recipe fields.
_HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# `PushToHubMixin.push_to_hub`'s keyword arguments: the first five apply to a recipe, the last two (weights) do not.
_PUSH_ARGUMENTS = ("private", "token", "revision", "create_pr", "commit_description", "max_shard_size", "tags")


def _refuse_unknown(method: str, given: Iterable[str], known: Collection[str]) -> None:
    unknown = [name for name in given if name not in known]
    if unknown:
        raise TypeError(f"{method} got unexpected keyword arguments {did_you_mean(unknown, known)}.")


@_suggest_fields_for_unknown_arguments
@dataclass(kw_only=True)
class SparseMLLMConfig(PushToHubMixin):
    r"""
    The sparse-training recipe used by [`SparseMLLMTrainer`].

    A dataclass whose fields are `transformers.HfArgumentParser` flags, saved as `sparse_mllm_config.json` beside the
    weights (and as a `sparse_mllm` dict in the model's `config.json`) so the base model's files keep their meaning.
    It is registered with `AutoConfig` under its `model_type`, `"sparse_mllm"`.

    Every value is checked on construction, with a `ValueError` naming the field, the expected type or range and the
    value. The string forms a command line or YAML file gives are converted: numbers (`"0.2"`, `"3"`; an `int` field
    takes only integers, neither `True` nor `2.0`), booleans (`true`/`false`, `yes`/`no`, `t`/`f`, `y`/`n`, `1`/`0`,
    any case: the forms `HfArgumentParser` accepts), `"none"`/`"null"` for an optional field and, for `skip_layers`,
    `"1,2"` or a list of strings (a command line gives `--skip_layers 1 2`). An unknown keyword argument is a `TypeError` that suggests the closest field, while
    [`~SparseMLLMConfig.from_pretrained`] ignores unknown keys with a warning (files from newer versions).

    Args:
        token_compressor (`str` or `None`, *optional*, defaults to `"divprune"`):
            Name of a registered visual token compressor (`hf_sparse_mllm.compressors.list_compressors()`), or `None`
            to feed every visual token to the language model.
        keep_ratio (`float`, *optional*, defaults to `0.25`):
            Fraction of each image's visual tokens kept on fast steps, in (0, 1]. Each compressor turns it into a
            number of tokens (`TokenCompressor.budget`): `max(1, round(keep_ratio * num_tokens))` for the selecting
            methods, a pooling stride for `pool`.
        num_keep (`int` or `None`, *optional*, defaults to `None`):
            Absolute number of visual tokens kept per image (an image with fewer keeps all); overrides `keep_ratio`.
        slow_mode_prob (`float`, *optional*, defaults to `0.1`):
            Probability that an optimizer step is a slow (all tokens, distilled) step in the instruction stage.
        num_isolator_tokens (`int`, *optional*, defaults to `4`):
            Number of learnable mode-isolator tokens prepended to each image's kept tokens on fast steps; `0`
            disables the isolator (naive pruning).
        distill_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the KL(teacher || student) term on slow steps, >= 0.
        distill_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of the distillation, > 0; the KL term is multiplied by its square.
        stage (`str`, *optional*, defaults to `"auto"`):
            `"alignment"` (projector training, language model frozen: fast steps only), `"instruction"` (fast/slow
            alternation) or `"auto"` (alignment when no language-model parameter requires grad).
        seed (`int`, *optional*, defaults to `42`):
            Seed of every sparse decision (step mode, random selection, skipped layers). Decisions are pure functions
            of this seed and the optimizer step, so they agree across processes and after resuming.
        max_nonfinite_steps (`int`, *optional*, defaults to `3`):
            Training stops with an error after this many consecutive optimizer steps whose loss is not finite.
        layer_skip_policy (`str` or `None`, *optional*, defaults to `None`):
            Name of a registered layer-skip policy (`hf_sparse_mllm.skipping.list_skip_policies()`; built in:
            `"stochastic"`, `"redundancy"`, `"fixed"`) or `None` to run every decoder layer. Skipped layers are not
            executed (no forward, no activations, no gradient) on fast steps; slow steps and their teacher run at full
            depth unless `skip_on_slow_steps=True`. A policy reads only the fields it names in `SkipPolicy.fields`;
            settings under which it would never skip a layer are rejected here, or by the trainer once the decoder
            depth is known, with the arithmetic in the message.
        skip_ratio (`float`, *optional*, defaults to `0.25`):
            Fraction of the decoder layers skipped per step, in [0, 1) (built-in reader: `redundancy`).
        max_skip_prob (`float`, *optional*, defaults to `0.5`):
            Highest skip probability of any layer, in [0, 1) (`stochastic`: the deepest skippable layer's, rising
            linearly with depth; `redundancy`: every layer's cap).
        protect_layers (`int`, *optional*, defaults to `1`):
            The rule every built-in policy follows: the first and last `protect_layers` decoder layers are never
            skipped, and must leave at least one layer that can be (`num_layers - 2 * protect_layers >= 1`). `fixed`
            rejects a `skip_layers` entry that is protected (set `protect_layers=0` to skip an end layer).
        measure_every (`int`, *optional*, defaults to `100`):
            Optimizer steps between the full-depth steps that measure layer redundancy, >= 1 (`redundancy`).
        skip_layers (`list[int]` or `None`, *optional*, defaults to `None`):
            Decoder layer indices skipped on every step that skips (`fixed`).
        skip_on_slow_steps (`bool`, *optional*, defaults to `False`):
            Also skip layers on slow steps (the all-token student and its fast-mode teacher skip the same layers),
            as STS's instruction stage skips layers with all tokens. By default slow steps run at full depth, so the
            model is trained as it is used at inference (all tokens, all layers) on every slow step; turning this on
            makes slow steps cheaper, and full-depth training then comes from the policy's unskipped layers (and, for
            `redundancy`, its measuring steps).
        stage_aware (`bool`, *optional*, defaults to `True`):
            Apply each kind of sparsity in its STS stage only: layer skipping and slow steps in the instruction stage,
            token compression in both. `False` applies every enabled component in every stage.
        sparse_mllm_version (`str`, *optional*, defaults to the installed version):
            Version of hf-sparse-mllm that wrote the config (kept when a saved config is loaded).
        resume_note (`str` or `None`, *optional*, defaults to `None`):
            Written by the trainer when a run resumed from a checkpoint with a changed recipe
            (`train(..., allow_recipe_change=True)`): which fields changed, from what to what, at which step.

    Example:

    ```python
    >>> from hf_sparse_mllm import SparseMLLMConfig
    >>> config = SparseMLLMConfig(token_compressor="divprune", keep_ratio="0.1", stage_aware="false")
    >>> config.keep_ratio, config.stage_aware
    (0.1, False)
    >>> SparseMLLMConfig(keep_ratio=1.5)
    Traceback (most recent call last):
    ...
    ValueError: keep_ratio must be in (0, 1], got 1.5.

    ```
    """

    model_type: ClassVar[str] = "sparse_mllm"

    token_compressor: Annotated[str | None, OneOf(list_compressors)] = _option(
        "divprune", lambda: f"Registered visual token compressor ({_names(list_compressors())}) or none."
    )
    keep_ratio: Annotated[float, Interval("(0, 1]")] = _option(
        0.25, "Fraction of visual tokens kept per image on fast steps, in (0, 1]."
    )
    num_keep: Annotated[int | None, Interval("[1, inf)")] = _option(
        None, "Absolute number of visual tokens kept per image; overrides keep_ratio."
    )
    slow_mode_prob: Annotated[float, Interval("[0, 1]")] = _option(
        0.1, "Probability of a slow (all-token, distilled) step in the instruction stage, in [0, 1]."
    )
    num_isolator_tokens: Annotated[int, Interval("[0, inf)")] = _option(
        4, "Learnable mode-isolator tokens prepended to each image on fast steps (0: off)."
    )
    distill_weight: Annotated[float, Interval("[0, inf)")] = _option(1.0, "Weight of the KL distillation term, >= 0.")
    distill_temperature: Annotated[float, Interval("(0, inf)")] = _option(1.0, "Temperature of the distillation, > 0.")
    stage: Literal["alignment", "instruction", "auto"] = _option(
        "auto", "Training stage: alignment, instruction or auto (alignment when the language model is frozen)."
    )
    seed: Annotated[int, Interval("[0, inf)")] = _option(
        42, "Seed of all sparse decisions (mode, selection, skipped layers)."
    )
    max_nonfinite_steps: Annotated[int, Interval("[1, inf)")] = _option(
        3, "Stop training with an error after this many consecutive optimizer steps with a non-finite loss."
    )
    layer_skip_policy: Annotated[str | None, OneOf(list_skip_policies)] = _option(
        None, lambda: f"Registered layer-skip policy ({_names(list_skip_policies())}) or none to run every layer."
    )
    skip_ratio: Annotated[float, Interval("[0, 1)")] = _option(
        0.25, lambda: f"Fraction of decoder layers skipped per step, in [0, 1); {_read_by('skip_ratio')}."
    )
    max_skip_prob: Annotated[float, Interval("[0, 1)")] = _option(
        0.5, lambda: f"Highest skip probability of a layer, in [0, 1); {_read_by('max_skip_prob')}."
    )
    protect_layers: Annotated[int, Interval("[0, inf)")] = _option(
        1, lambda: f"First and last N decoder layers are never skipped; {_read_by('protect_layers')}."
    )
    measure_every: Annotated[int, Interval("[1, inf)")] = _option(
        100, lambda: f"Optimizer steps between full-depth redundancy measurements; {_read_by('measure_every')}."
    )
    skip_layers: Annotated[list[int] | None, Interval("[0, inf)")] = _option(
        None, lambda: f"Decoder layer indices skipped on every step that skips; {_read_by('skip_layers')}."
    )
    skip_on_slow_steps: bool = _option(False, "Skip layers on slow (all-token) steps too, not only on fast steps.")
    stage_aware: bool = _option(True, "Skip layers and take slow steps only in the instruction stage.")
    sparse_mllm_version: str = _option(__version__, "Version of hf-sparse-mllm that wrote this config.")
    resume_note: str | None = _option(
        None,
        "Set by the trainer when a run resumed with a changed recipe (train(allow_recipe_change=True)): the fields, "
        "their two values and the step.",
    )

    def __post_init__(self):
        for spec in _field_specs():
            setattr(self, spec.name, spec.convert(getattr(self, spec.name)))
        self._check_layer_skipping()

    def _check_layer_skipping(self) -> None:
        if self.skip_on_slow_steps and self.layer_skip_policy is None:
            logger.warning("skip_on_slow_steps=True has no effect without a layer_skip_policy.")
        if self.layer_skip_policy is None:
            return
        policy = get_skip_policy(self.layer_skip_policy)
        policy.validate(**self.skip_policy_fields())
        unused = [
            f.name
            for f in fields(self)
            if f.name in _SKIP_FIELDS and f.name not in policy.fields and getattr(self, f.name) != f.default
        ]
        if unused:
            logger.warning(
                "%s %s only used by other layer skip policies; ignored with %r.",
                ", ".join(unused),
                "is" if len(unused) == 1 else "are",
                self.layer_skip_policy,
            )

    def skip_policy_fields(self) -> dict[str, Any]:
        """The values of the fields the configured layer-skip policy reads (empty without a policy)."""
        if self.layer_skip_policy is None:
            return {}
        return {name: getattr(self, name) for name in get_skip_policy(self.layer_skip_policy).fields}

    def check_decoder_depth(self, num_layers: int) -> None:
        """Checks that need the model's decoder depth (called by the trainer): the policy's `validate`."""
        if self.layer_skip_policy is not None:
            get_skip_policy(self.layer_skip_policy).validate(num_layers, **self.skip_policy_fields())

    @property
    def compression_enabled(self) -> bool:
        return self.token_compressor is not None

    # ---- saving and loading ---------------------------------------------------------------------------------------

    def recipe_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able values, sorted by name (the `sparse_mllm` dict of a model's `config.json`)."""
        return dict(sorted(asdict(self).items()))

    def to_dict(self) -> dict[str, Any]:
        """What `sparse_mllm_config.json` holds: the `model_type` and [`~SparseMLLMConfig.recipe_dict`]."""
        return {"model_type": self.model_type, **self.recipe_dict()}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Write the recipe to `save_directory/sparse_mllm_config.json` (a base `config.json` there is left alone).

        With `push_to_hub=True` the file is also uploaded; `kwargs` are those of [`~SparseMLLMConfig.push_to_hub`]
        plus `repo_id` (defaults to the folder's name), as for any `transformers` config.
        """
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, SPARSE_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.to_json_string())
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.push_to_hub(repo_id, **kwargs)
        return [path]

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, **kwargs):
        """Upload `sparse_mllm_config.json`, and nothing else, to `repo_id` (created if missing).

        Unlike `PushToHubMixin.push_to_hub` this writes no `README.md`, so it can add the recipe to a model repo.
        Uses the Hub client and commit path of `transformers` (`hf_api()`, `_upload_modified_files`). Of that
        method's keyword arguments, `private`, `token`, `revision`, `create_pr` and `commit_description` apply; the
        ones for weights (`max_shard_size`, `tags`) are accepted and ignored; any other name is a `TypeError`.
        """
        from transformers.utils.hub import hf_api

        _refuse_unknown("SparseMLLMConfig.push_to_hub", kwargs, _PUSH_ARGUMENTS)
        token = kwargs.get("token")
        repo_id = hf_api().create_repo(repo_id, private=kwargs.get("private"), token=token, exist_ok=True).repo_id
        upload = {name: kwargs[name] for name in ("revision", "create_pr", "commit_description") if name in kwargs}
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return self._upload_modified_files(
                folder,
                repo_id,
                files_timestamps={},
                commit_message=commit_message or "Upload sparse training recipe",
                token=token,
                **upload,
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SparseMLLMConfig:
        """Read the recipe from a local folder or a Hub repo id (downloading `sparse_mllm_config.json` only).

        A folder or repo without that file but whose `config.json` carries the recipe under `sparse_mllm` (written
        by [`SparseMLLMTrainer`] on every save) is read from there. As in `PreTrainedConfig.from_pretrained`, the
        keyword arguments `cache_dir`, `force_download`, `proxies`, `token`, `revision`, `local_files_only` and
        `subfolder` go to `transformers.utils.hub.cached_file`; the others replace loaded values (field names only).
        Any other name is a `TypeError` before anything is downloaded.
        """
        _refuse_unknown("SparseMLLMConfig.from_pretrained", kwargs, [*_HUB_ARGUMENTS, *(f.name for f in fields(cls))])
        hub_kwargs = {name: kwargs.pop(name) for name in _HUB_ARGUMENTS if name in kwargs}
        hub_kwargs["_raise_exceptions_for_missing_entries"] = False
        path = cached_file(pretrained_model_name_or_path, SPARSE_CONFIG_NAME, **hub_kwargs)
        if path is not None:
            return cls.from_json_file(path, **kwargs)
        base_path = cached_file(pretrained_model_name_or_path, "config.json", **hub_kwargs)
        recipe = _read_json(base_path).get("sparse_mllm") if base_path is not None else None
        if not isinstance(recipe, dict):
            raise OSError(
                f"{pretrained_model_name_or_path} has no {SPARSE_CONFIG_NAME}, nor a config.json with a `sparse_mllm` "
                "recipe: save the recipe with SparseMLLMConfig.save_pretrained or train with SparseMLLMTrainer."
            )
        logger.info(
            "No %s in %s: reading the recipe from config.json.", SPARSE_CONFIG_NAME, pretrained_model_name_or_path
        )
        return cls.from_dict(recipe, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], **overrides) -> SparseMLLMConfig:
        """Build the config from a saved dict: unknown keys (from newer versions) are dropped with a warning, missing
        keys take their defaults. `overrides` are keyword arguments of the constructor and win over the dict."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known - {"model_type"})
        if unknown:
            logger.warning(
                "Ignoring unknown SparseMLLMConfig keys %s (written by hf-sparse-mllm %s; this is %s).",
                unknown,
                config_dict.get("sparse_mllm_version", "?"),
                __version__,
            )
        return cls(**{**{k: v for k, v in config_dict.items() if k in known}, **overrides})

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike, **overrides) -> SparseMLLMConfig:
        """[`~SparseMLLMConfig.from_dict`] of a saved `sparse_mllm_config.json`."""
        return cls.from_dict(_read_json(json_file), **overrides)


def _read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


# ---- checking and converting values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FieldSpec:
    """What a field accepts, read from its annotation: a kind (`bool`, `int`, `float`, `str` or `list` of `int`),
    whether `None` is allowed, and an `Interval` or a set of names."""

    name: str
    kind: type
    optional: bool
    interval: Interval | None
    names: Callable[[], Iterable[str]] | None

    def expected(self) -> str:
        """What the field accepts, in words: "a float in (0, 1]", "a list of ints, each >= 0, or None"."""
        text = _KIND_TEXT[self.kind]
        if self.kind is float and self.interval is not None and self.interval.high == float("inf"):
            text = "a finite float"
        if self.interval is not None:
            text += f", each {self.interval}," if self.kind is list else f" {self.interval}"
        return text + (" or None" if self.optional else "")

    def convert(self, value: Any) -> Any:
        """`value` as the field's type, or a `ValueError` naming the field, what it accepts and the value."""
        if self.optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS)):
            return None
        try:
            converted = _CONVERTERS[self.kind](value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.name} must be {self.expected()}, got {value!r} ({type(value).__name__})."
            ) from None
        if self.interval is not None:
            items = converted if self.kind is list else [converted]
            if not all(item in self.interval for item in items):
                which = "must contain only integers" if self.kind is list else "must be"
                raise ValueError(f"{self.name} {which} {self.interval}, got {value!r}.")
        if self.names is not None and converted not in (allowed := sorted(self.names())):
            raise ValueError(
                f"{self.name} must be one of {allowed}{' or None' if self.optional else ''}, got {value!r}."
            )
        return converted


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    raise ValueError(value)


def _to_int(value: Any) -> int:
    # `True` is an int to Python, and `2.0` an integral float: both are more likely a value meant for another field
    # than a count, so only integers (and numpy integers) and their strings pass.
    if isinstance(value, bool):
        raise TypeError(value)
    return int(value.strip()) if isinstance(value, str) else operator.index(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise TypeError(value)
    if not math.isfinite(number := float(value)):
        raise ValueError(value)
    return number


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _to_int_list(value: Any) -> list[int]:
    if isinstance(value, str):
        value = re.split(r"[,\s]+", value.strip())
    if not isinstance(value, (list, tuple)):
        raise TypeError(value)
    return [_to_int(item) for item in value]


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, list: _to_int_list}
_KIND_TEXT = {
    bool: "a bool (true or false)",
    int: "an int",
    float: "a float",
    str: "a str",
    list: "a list of ints",
}


@functools.cache
def _field_specs() -> tuple[_FieldSpec, ...]:
    # The annotations, not `Field.type`: `HfArgumentParser` overwrites the latter with the bare type it parses.
    hints = get_type_hints(SparseMLLMConfig, include_extras=True)
    return tuple(_field_spec(f.name, hints[f.name]) for f in fields(SparseMLLMConfig))


def _field_spec(name: str, hint: Any) -> _FieldSpec:
    constraints: tuple = ()
    if get_origin(hint) is Annotated:
        hint, *constraints = get_args(hint)
    optional = get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)
    if optional:
        (hint,) = [arg for arg in get_args(hint) if arg is not type(None)]
    names = next((c.names for c in constraints if isinstance(c, OneOf)), None)
    if get_origin(hint) is Literal:
        names, hint = functools.partial(get_args, hint), str
    kind = get_origin(hint) or hint
    if kind not in _CONVERTERS or (kind is list and get_args(hint) != (int,)):
        raise TypeError(f"SparseMLLMConfig.{name} has a type the config cannot check: {hint!r}.")
    interval = next((c for c in constraints if isinstance(c, Interval)), None)
    return _FieldSpec(name, kind, optional, interval, names)
