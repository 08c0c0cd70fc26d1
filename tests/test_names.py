"""Names against the registries and signatures that know them: a taken name is refused with what to do, an unknown
keyword is answered with the closest one (`hf_sparse_mllm._names`, shared by the registries and the config)."""

from __future__ import annotations

import doctest

import pytest

from hf_sparse_mllm import _names
from hf_sparse_mllm.adapters import ArchitectureAdapter, register_adapter, supported_model_types
from hf_sparse_mllm.evaluation.tasks import list_tasks, register_task
from hf_sparse_mllm.tiny import list_tiny_families, register_tiny_family


def test_docstring_examples():
    results = doctest.testmod(_names, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0


def test_did_you_mean_names_the_closest_or_nothing():
    assert _names.did_you_mean(["hidden_sise", "zzz"], ["hidden_size", "patch_size"]) == (
        "'hidden_sise' (did you mean 'hidden_size'?), 'zzz'"
    )
    assert _names.did_you_mean([], ["hidden_size"]) == ""


def test_taken_names_are_refused_with_the_holder_and_a_free_name():
    with pytest.raises(ValueError, match=r"Tiny family 'llava' is already taken by build_tiny_llava_and_processor; "):

        @register_tiny_family("llava")
        def build_again(*, words, seed=0, padding_side="right"):
            raise AssertionError("never built")

    with pytest.raises(
        ValueError, match=r"Task name 'gqa' is already taken by _gqa; .*@register_task\('gqa_custom'\)"
    ):

        @register_task("gqa")
        def gqa_again(**overrides):
            raise AssertionError("never built")

    # An adapter under another name would never be looked up: the message says so instead of suggesting one.
    with pytest.raises(ValueError, match=r"'llava' is already taken by LlavaAdapter; adapters are looked up by"):

        @register_adapter("llava")
        class LlavaAgain(ArchitectureAdapter):
            pass

    assert "gqa" in list_tasks() and "llava" in list_tiny_families() and "llava" in supported_model_types()
