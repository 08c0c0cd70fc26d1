"""Where the parts of a `transformers` vision-language model live, found the same way for every architecture."""

from __future__ import annotations

from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The `transformers` model inside a PEFT wrapper (`PeftModel.get_base_model()`), else `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and type(model).__name__.startswith("Peft") else model


def decoder(model: nn.Module) -> nn.Module:
    """The language model's decoder: the module holding the decoder layers (`model.get_decoder()`, or one level deeper
    where `get_decoder()` returns a causal LM, as for Llama 4)."""
    model = base_model(model)
    found = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if found is not None and not _has_layers(found):
        found = getattr(found, "model", None)  # Llama 4: `get_decoder()` is the causal LM, its decoder one below
    if found is not None and _has_layers(found):
        return found
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: neither `model.get_decoder().layers` nor one "
        "level below it is a ModuleList. Layer skipping needs them; register an architecture adapter "
        "(hf_sparse_mllm.adapters.register_adapter) whose `decoder()` returns the module that runs them."
    )


def _has_layers(module) -> bool:
    return isinstance(getattr(module, "layers", None), nn.ModuleList)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def kv_store_layers(model: nn.Module) -> frozenset[int]:
    """Decoder layers whose keys and values later layers reuse (`text_config.kv_sharing_modes` "store", e.g. Gemma 4
    with `num_kv_shared_layers`): a skipped one would leave those layers nothing to read, so they always run."""
    text = base_model(model).config.get_text_config()
    modes = getattr(text, "kv_sharing_modes", None) if getattr(text, "num_kv_shared_layers", 0) else None
    return frozenset(i for i, mode in enumerate(modes or ()) if mode == "store")


def text_hidden_size(model: nn.Module) -> int:
    config = base_model(model).config
    return config.get_text_config().hidden_size
