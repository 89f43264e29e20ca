"""Forward hooks on diffusers FLUX attention modules (the distillation targets).

Every double-stream block's attention yields two outputs (image tokens, text
tokens); every single-stream block's attention one (text + image tokens, text
first).  Keys: ``("double", i, "img")``, ``("double", i, "txt")``,
``("single", j)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch


class AttentionCapture:
    """Registers hooks once; ``sink(key, tensor)`` receives each output while ``active``."""

    def __init__(self, transformer):
        self.sink: Callable | None = None
        self.active = False
        self.handles = []
        for i, block in enumerate(transformer.transformer_blocks):
            self.handles.append(block.attn.register_forward_hook(self._double_hook(i)))
        for j, block in enumerate(transformer.single_transformer_blocks):
            self.handles.append(block.attn.register_forward_hook(self._single_hook(j)))

    def _double_hook(self, i):
        def hook(module, args, output):
            if self.active and self.sink is not None:
                self.sink(("double", i, "img"), output[0])
                self.sink(("double", i, "txt"), output[1])
        return hook

    def _single_hook(self, j):
        def hook(module, args, output):
            if self.active and self.sink is not None:
                self.sink(("single", j), output)
        return hook

    def run(self, sink: Callable, fn: Callable):
        """Call ``fn()`` with hooks feeding ``sink``; inactive afterwards."""
        with self.feeding(sink):
            return fn()

    @contextmanager
    def feeding(self, sink: Callable):
        """Hooks feed ``sink`` inside the ``with`` block, and only there.

        Activation checkpointing re-runs a block's forward during backward.  A sink that builds autograd
        graph inside a checkpointed block (the distillation loss does) must do the same work again on that
        recomputation, or torch's checkpoint sees fewer saved tensors than in the original forward; so the
        distillation trainer keeps the hooks fed (with a sink that recomputes and discards) around
        ``backward()``."""
        previous = (self.sink, self.active)
        self.sink, self.active = sink, True
        try:
            yield self
        finally:
            self.sink, self.active = previous

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def collect(capture: AttentionCapture, fn: Callable, dtype: torch.dtype | None = None) -> dict:
    """Run ``fn`` and return every captured output (detached)."""
    store = {}

    def sink(key, t):
        store[key] = t.detach() if dtype is None else t.detach().to(dtype)

    capture.run(sink, fn)
    return store
