"""A bounded cache of encodings, keyed on exactly what the MLLM would see.

The key is a digest of the prepared model inputs (token ids, attention mask,
pixel / audio tensors - i.e. after the prompt preset, media resizing and
padding are applied) plus the encoder's identity and options, so two requests
share an entry only when the forward pass would be identical.  Entries are
held on the CPU and evicted least-recently-used beyond ``max_bytes``.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from typing import Any

import torch

from ..errors import X2IInputError

DEFAULT_MAX_MB = 1024  # X2I_ENCODE_CACHE_MB overrides it, read when a cache is made (not at import)


def default_max_bytes() -> int:
    raw = os.environ.get("X2I_ENCODE_CACHE_MB", str(DEFAULT_MAX_MB))
    try:
        return int(float(raw) * 2**20)
    except ValueError:
        raise X2IInputError(f"X2I_ENCODE_CACHE_MB must be a number of megabytes, got {raw!r}") from None

# Forward passes per encoder name (tests and benchmarks read it to prove a cache hit ran nothing).
FORWARD_CALLS: collections.Counter = collections.Counter()


def digest(batch: dict[str, Any], *extra: Any) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(value).encode())
    h.update(repr(extra).encode())
    return h.hexdigest()


class EncodeCache:
    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self._items: collections.OrderedDict[str, tuple[torch.Tensor, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (hidden.detach().to("cpu"), size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
