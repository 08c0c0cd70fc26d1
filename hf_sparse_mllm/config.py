"""`SparseMLLMConfig`: the sparse-training recipe, saved next to the model under its own file name."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, fields
from difflib import get_close_matches

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from . import __version__

logger = logging.getLogger(__name__)

SPARSE_CONFIG_NAME = "sparse_mllm_config.json"
STAGES = ("alignment", "instruction", "auto")
# Fields that belong to layer-skip policies (each policy names the ones it reads in `SkipPolicy.fields`).
_SKIP_FIELDS = ("skip_ratio", "max_skip_prob", "protect_layers", "measure_every", "skip_layers")


@strict(accept_kwargs=True)
@dataclass(repr=False)
class SparseMLLMConfig(PreTrainedConfig):
    r"""
    The sparse-training recipe used by [`SparseMLLMTrainer`].

    It is a `transformers` config with its own `model_type` (`"sparse_mllm"`), saved as `sparse_mllm_config.json`
    beside the weights so the base model's `config.json` is never overwritten. Values are checked on construction
    (`ValueError` naming the field and its allowed values); an unknown keyword argument is a `TypeError` that suggests
    the closest field, while `from_pretrained` ignores unknown keys with a warning (files from newer versions).

    Args:
        token_compressor (`str` or `None`, *optional*, defaults to `"divprune"`):
            Name of a registered visual token compressor (see `hf_sparse_mllm.compressors.list_compressors()`), or
            `None` to feed every visual token to the language model.
        keep_ratio (`float`, *optional*, defaults to `0.25`):
            Fraction of each image's visual tokens kept on fast steps, in (0, 1]. The budget is
            `k = max(1, round(keep_ratio * num_tokens))`.
        num_keep (`int` or `None`, *optional*, defaults to `None`):
            Absolute number of visual tokens kept per image; overrides `keep_ratio` when set.
        slow_mode_prob (`float`, *optional*, defaults to `0.1`):
            Probability that an optimizer step is a slow (all tokens, distilled) step in the instruction stage.
        num_isolator_tokens (`int`, *optional*, defaults to `4`):
            Number of learnable mode-isolator tokens prepended to each image's kept tokens on fast steps; `0`
            disables the isolator (naive pruning).
        distill_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the KL(teacher || student) term on slow steps.
        distill_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of the distillation; the KL term is multiplied by its square.
        stage (`str`, *optional*, defaults to `"auto"`):
            `"alignment"` (projector training, language model frozen: fast steps only), `"instruction"` (fast/slow
            alternation) or `"auto"` (alignment when no language-model parameter requires grad).
        seed (`int`, *optional*, defaults to `42`):
            Seed of every sparse decision (step mode, random selection, skipped layers). Decisions are pure functions
            of this seed and the optimizer step, so they agree across processes and after resuming.
        layer_skip_policy (`str` or `None`, *optional*, defaults to `None`):
            Registered layer-skip policy (`"stochastic"`, `"redundancy"`, `"fixed"`) or `None` to run every decoder
            layer. Skipped layers are not executed (no forward, no activations, no gradient) on fast steps; slow steps
            and their teacher run at full depth unless `skip_on_slow_steps=True`.
        skip_ratio (`float`, *optional*, defaults to `0.25`):
            `redundancy` policy: fraction of the decoder layers skipped per step, in [0, 1).
        max_skip_prob (`float`, *optional*, defaults to `0.5`):
            `stochastic` policy: skip probability of the deepest skippable layer, in [0, 1); it rises linearly with depth.
        protect_layers (`int`, *optional*, defaults to `1`):
            The first and last `protect_layers` decoder layers are never skipped (at most half the depth).
        measure_every (`int`, *optional*, defaults to `100`):
            `redundancy` policy: every `measure_every` optimizer steps a full-depth step measures layer redundancy.
        skip_layers (`list[int]` or `None`, *optional*, defaults to `None`):
            `fixed` policy: the decoder layer indices skipped on every fast step (and slow step, with
            `skip_on_slow_steps`).
        skip_on_slow_steps (`bool`, *optional*, defaults to `False`):
            Also skip layers on slow steps (the all-token student and its fast-mode teacher skip the same layers),
            as STS's instruction stage skips layers with all tokens. By default slow steps run at full depth, so the
            model is trained as it is used at inference (all tokens, all layers) on every slow step; turning this on
            makes slow steps cheaper, and full-depth training then comes from the policy's unskipped layers (and, for
            `redundancy`, its measuring steps).
        stage_aware (`bool`, *optional*, defaults to `True`):
            Apply each kind of sparsity in its STS stage only: layer skipping and slow steps in the instruction stage,
            token compression in both. `False` applies every enabled component in every stage.

    Example:

    ```python
    >>> from hf_sparse_mllm import SparseMLLMConfig
    >>> config = SparseMLLMConfig(token_compressor="divprune", keep_ratio=0.1, slow_mode_prob=0.1)
    >>> config.keep_ratio
    0.1
    ```
    """

    model_type = "sparse_mllm"

    token_compressor: str | None = field(
        default="divprune",
        metadata={
            "help": "Registered visual token compressor (divprune, pool, random, redundancy, cls_attention) or None."
        },
    )
    keep_ratio: float | int = field(
        default=0.25, metadata={"help": "Fraction of visual tokens kept per image on fast steps, in (0, 1]."}
    )
    num_keep: int | None = field(
        default=None, metadata={"help": "Absolute number of visual tokens kept per image; overrides keep_ratio."}
    )
    slow_mode_prob: float | int = field(
        default=0.1, metadata={"help": "Probability of a slow (all-token, distilled) step in the instruction stage."}
    )
    num_isolator_tokens: int = field(
        default=4, metadata={"help": "Learnable mode-isolator tokens prepended to each image on fast steps (0: off)."}
    )
    distill_weight: float | int = field(default=1.0, metadata={"help": "Weight of the KL distillation term."})
    distill_temperature: float | int = field(default=1.0, metadata={"help": "Temperature of the distillation."})
    stage: str = field(default="auto", metadata={"help": "Training stage: alignment, instruction or auto."})
    seed: int = field(default=42, metadata={"help": "Seed of all sparse decisions (mode, selection, skipped layers)."})
    layer_skip_policy: str | None = field(
        default=None,
        metadata={"help": "Layer-skip policy (stochastic, redundancy, fixed) or None to run every layer."},
    )
    skip_ratio: float | int = field(
        default=0.25, metadata={"help": "redundancy policy: fraction of decoder layers skipped per step, in [0, 1)."}
    )
    max_skip_prob: float | int = field(
        default=0.5,
        metadata={"help": "stochastic policy: skip probability of the deepest skippable layer, in [0, 1)."},
    )
    protect_layers: int = field(default=1, metadata={"help": "First and last N decoder layers are never skipped."})
    measure_every: int = field(
        default=100, metadata={"help": "redundancy policy: optimizer steps between full-depth measurements."}
    )
    skip_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "fixed policy: decoder layer indices skipped on every fast step (slow too with skip_on_slow_steps)."
        },
    )
    skip_on_slow_steps: bool = field(
        default=False, metadata={"help": "Skip layers on slow (all-token) steps too, not only on fast steps."}
    )
    stage_aware: bool = field(
        default=True, metadata={"help": "Skip layers and take slow steps only in the instruction stage."}
    )
    sparse_mllm_version: str = field(
        default=__version__, metadata={"help": "Version of hf-sparse-mllm that wrote this config."}
    )

    def __post_init__(self, **kwargs):
        from .compressors import list_compressors

        if kwargs:
            # `PreTrainedConfig` keeps unknown keyword arguments as attributes, so a misspelt field would silently
            # train another recipe. Loading stays lenient: `from_dict` drops unknown keys with a warning first.
            own = _recipe_fields()
            hints = [
                f"{k!r} (did you mean {m[0]!r}?)" if (m := get_close_matches(k, own, n=1)) else repr(k) for k in kwargs
            ]
            raise TypeError(f"SparseMLLMConfig got unexpected keyword arguments {', '.join(hints)}. Fields: {own}.")
        if self.token_compressor is not None and self.token_compressor not in list_compressors():
            raise ValueError(
                f"token_compressor must be one of {list_compressors()} or None, got {self.token_compressor!r}."
            )
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}.")
        if self.num_keep is not None and self.num_keep < 1:
            raise ValueError(f"num_keep must be a positive integer or None, got {self.num_keep}.")
        if not 0 <= self.slow_mode_prob <= 1:
            raise ValueError(f"slow_mode_prob must be in [0, 1], got {self.slow_mode_prob}.")
        if self.num_isolator_tokens < 0:
            raise ValueError(f"num_isolator_tokens must be >= 0, got {self.num_isolator_tokens}.")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}.")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}.")
        if isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}.")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}.")
        self._validate_skipping()
        super().__post_init__(**kwargs)

    def _validate_skipping(self) -> None:
        from .skipping import get_skip_policy, list_skip_policies

        if self.layer_skip_policy is not None and self.layer_skip_policy not in list_skip_policies():
            raise ValueError(
                f"layer_skip_policy must be one of {list_skip_policies()} or None, got {self.layer_skip_policy!r}."
            )
        if not 0 <= self.skip_ratio < 1:
            raise ValueError(f"skip_ratio must be in [0, 1), got {self.skip_ratio}.")
        if not 0 <= self.max_skip_prob < 1:
            raise ValueError(f"max_skip_prob must be in [0, 1), got {self.max_skip_prob}.")
        if self.protect_layers < 0:
            raise ValueError(f"protect_layers must be >= 0, got {self.protect_layers}.")
        if self.measure_every < 1:
            raise ValueError(f"measure_every must be >= 1, got {self.measure_every}.")
        if self.skip_layers is not None and any(i < 0 for i in self.skip_layers):
            raise ValueError(f"skip_layers must be non-negative layer indices, got {self.skip_layers}.")
        if self.skip_on_slow_steps and self.layer_skip_policy is None:
            logger.warning("skip_on_slow_steps=True has no effect without a layer_skip_policy.")
        if self.layer_skip_policy is None:
            return
        policy = get_skip_policy(self.layer_skip_policy)
        policy.validate(**self.skip_policy_fields())
        defaults = {f.name: f.default for f in fields(self)}
        unused = [name for name in _SKIP_FIELDS if name not in policy.fields and getattr(self, name) != defaults[name]]
        if unused:
            logger.warning(
                "%s %s only used by other layer skip policies; ignored with %r.",
                ", ".join(unused),
                "is" if len(unused) == 1 else "are",
                self.layer_skip_policy,
            )

    def skip_policy_fields(self) -> dict:
        """The values of the fields the configured layer-skip policy reads (empty without a policy)."""
        if self.layer_skip_policy is None:
            return {}
        from .skipping import get_skip_policy

        return {name: getattr(self, name) for name in get_skip_policy(self.layer_skip_policy).fields}

    def check_decoder_depth(self, num_layers: int) -> None:
        """Checks that need the model's decoder depth (called by the trainer)."""
        if self.layer_skip_policy is not None:
            from .skipping import get_skip_policy

            get_skip_policy(self.layer_skip_policy).validate(num_layers, **self.skip_policy_fields())

    @property
    def compression_enabled(self) -> bool:
        return self.token_compressor is not None

    def recipe_dict(self) -> dict:
        """The recipe fields only (no generic `PreTrainedConfig` attributes), as plain JSON-able values."""
        return {name: getattr(self, name) for name in _recipe_fields()}

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Write the recipe to `save_directory/sparse_mllm_config.json` (the base `config.json` is left alone).

        With `push_to_hub=True` the file is also uploaded; `kwargs` are those of [`~SparseMLLMConfig.push_to_hub`]
        plus `repo_id` (defaults to the folder's name), as for any `transformers` config.
        """
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, SPARSE_CONFIG_NAME)
        self.to_json_file(path, use_diff=False)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.push_to_hub(repo_id, **kwargs)
        return [path]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **kwargs,
    ):
        """Upload `sparse_mllm_config.json`, and nothing else, to `repo_id` (created if missing).

        Unlike `PreTrainedConfig.push_to_hub` this never writes `config.json` nor the repo's `README.md`, so it can
        add the recipe to a model repo. Uses the same Hub client and commit path as `transformers`.
        """
        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return self._upload_modified_files(
                folder,
                repo_id,
                files_timestamps={},
                commit_message=commit_message or "Upload sparse training recipe",
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SparseMLLMConfig:
        """Read the recipe from a local folder or a Hub repo id (downloading `sparse_mllm_config.json` only).

        A folder or repo without that file but whose `config.json` carries the recipe under `sparse_mllm` (written
        by [`SparseMLLMTrainer`] on every save) is read from there.
        """
        kwargs.setdefault("_configuration_file", SPARSE_CONFIG_NAME)
        fallback_kwargs = {k: v for k, v in kwargs.items() if k != "_configuration_file"}
        try:
            config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        except OSError as error:
            try:
                base_dict, kwargs = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **fallback_kwargs)
            except OSError:
                raise error from None
            if not isinstance(base_dict.get("sparse_mllm"), dict):
                raise error
            logger.info(
                "No %s in %s: reading the recipe from config.json.", SPARSE_CONFIG_NAME, pretrained_model_name_or_path
            )
            config_dict = base_dict["sparse_mllm"]
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> SparseMLLMConfig:
        known = {f.name for f in fields(cls)} | {"model_type"}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            logger.warning(
                "Ignoring unknown SparseMLLMConfig keys %s (written by hf-sparse-mllm %s; this is %s).",
                unknown,
                config_dict.get("sparse_mllm_version", "?"),
                __version__,
            )
        config_dict = {k: v for k, v in config_dict.items() if k in known and k != "model_type"}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> SparseMLLMConfig:
        # The stock one calls `cls(**file)`, which would reject the file's `model_type` (and keys of newer versions).
        return cls.from_dict(cls._dict_from_json_file(json_file))

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps({"model_type": self.model_type, **self.recipe_dict()}, indent=2, sort_keys=True) + "\n"


def _recipe_fields() -> list[str]:
    """Names of the recipe's own fields (not the generic `PreTrainedConfig` ones), sorted."""
    return sorted({f.name for f in fields(SparseMLLMConfig)} - {f.name for f in fields(PreTrainedConfig)})
