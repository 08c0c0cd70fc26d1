"""Run a decoder without some of its layers: a skipped layer's input is passed through unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _identity(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def bypass_layers(layers: nn.ModuleList, skip: Iterable[int]) -> Iterator[None]:
    """Within the context, the layers at `skip` are not executed: no forward, no stored activations, no gradient.

    The bypass shadows each skipped layer's `forward` on the instance (which also bypasses the class-level activation
    checkpointing wrapper), so the `ModuleList`, the layer indices seen by the model (`config.layer_types[i]`, cache
    slots) and the state-dict keys stay as they are. Keep the context open over the backward pass too: activation
    checkpointing replays forwards during backward and must replay the same depth.
    """
    skipped = [layers[i] for i in sorted(set(skip))]
    for layer in skipped:
        layer.forward = _identity
    try:
        yield
    finally:
        for layer in skipped:
            del layer.forward


@contextlib.contextmanager
def measure_layer_redundancy(layers: nn.ModuleList, sink: dict[int, list[float]]) -> Iterator[None]:
    """Record, per layer, the cosine similarity between its input and output hidden states (mean over tokens)."""

    def hook(index):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                sim = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1).mean()
            sink.setdefault(index, []).append(float(sim))

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
