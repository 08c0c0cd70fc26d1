"""Run a decoder without some of its layers, and measure how much each layer changes its input."""

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


class RedundancyMeter:
    """Token-weighted sums of each decoder layer's input/output cosine similarity, over the forwards it watched.

    Example:

    ```python
    >>> import torch
    >>> from hf_sparse_mllm.skipping.bypass import RedundancyMeter
    >>> decoder = torch.nn.Module()
    >>> decoder.layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Linear(4, 4)])
    >>> meter = RedundancyMeter(2)
    >>> with meter.watch(decoder, decoder.layers):
    ...     _ = decoder.layers[1](decoder.layers[0](torch.randn(1, 3, 4)))
    >>> meter.counts, round(meter.means()[0], 4)
    ([3, 3], 1.0)

    ```
    """

    def __init__(self, num_layers: int):
        self.sums = [0.0] * num_layers
        self.counts = [0] * num_layers

    def means(self) -> list[float]:
        return [s / max(c, 1) for s, c in zip(self.sums, self.counts)]

    @contextlib.contextmanager
    def watch(self, decoder: nn.Module, layers: nn.ModuleList) -> Iterator[RedundancyMeter]:
        """Record every forward through `layers` within the context.

        `decoder` is the module that runs `layers`: its 2-D `attention_mask` argument, when it gets one, leaves
        padding positions out of the averages.
        """
        mask: list[torch.Tensor | None] = [None]

        def on_decoder(module, args, kwargs):
            value = kwargs.get("attention_mask")
            mask[0] = value if isinstance(value, torch.Tensor) and value.dim() == 2 else None

        def on_layer(index):
            def record(module, args, kwargs, output):
                hidden_in = args[0] if args else kwargs["hidden_states"]
                hidden_out = output[0] if isinstance(output, tuple) else output
                with torch.no_grad():
                    sim = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
                    if mask[0] is not None and mask[0].shape == sim.shape:
                        keep = mask[0].to(sim.device).bool()
                        total, count = float(sim[keep].sum()), int(keep.sum())
                    else:
                        total, count = float(sim.sum()), sim.numel()
                self.sums[index] += total
                self.counts[index] += count

            return record

        handles = [decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)]
        handles += [layer.register_forward_hook(on_layer(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
