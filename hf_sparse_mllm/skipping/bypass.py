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
    # Accelerate's dispatch hooks (device_map, offloading) also live in the instance's `forward`: put them back.
    previous = [vars(layer).get("forward") for layer in skipped]
    for layer in skipped:
        layer.forward = _identity
    try:
        yield
    finally:
        for layer, forward in zip(skipped, previous):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@contextlib.contextmanager
def measure_layer_redundancy(layers: nn.ModuleList, sink: dict) -> Iterator[None]:
    """Accumulate, per layer, the cosine similarity between its input and output hidden states over real tokens.

    `sink[i]` becomes `[sum of similarities, number of tokens]`; if the caller puts the forward's `(batch, seq)`
    attention mask under `sink["mask"]`, padding positions are left out.
    """

    def hook(index):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                sim = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
                mask = sink.get("mask")
                if mask is not None and mask.shape == sim.shape:
                    keep = mask.to(sim.device).bool()
                    total, count = float(sim[keep].sum()), int(keep.sum())
                else:
                    total, count = float(sim.sum()), sim.numel()
            entry = sink.setdefault(index, [0.0, 0])
            entry[0] += total
            entry[1] += count

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
