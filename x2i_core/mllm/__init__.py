"""MLLM encoders behind one protocol; the family is detected from config.json."""

from __future__ import annotations

import os

from ..errors import X2IFileError
from .base import EncodeRequest, HiddenStates, MLLMEncoder
from .qwen25vl import Qwen25VLEncoder, read_model_config

FAMILIES = {"qwen2_5_vl": Qwen25VLEncoder}


def load_mllm(path: str | os.PathLike, *, dtype="auto", device="cpu") -> MLLMEncoder:
    cfg = read_model_config(path)
    model_type = cfg.get("model_type")
    cls = FAMILIES.get(model_type)
    if cls is None:
        raise X2IFileError(
            f"MLLM folder '{os.fspath(path)}' holds model_type {model_type!r}; supported: {sorted(FAMILIES)} "
            "(Qwen2.5-VL-3B/7B-Instruct)"
        )
    return cls.from_pretrained(path, dtype=dtype, device=device)


__all__ = ["EncodeRequest", "HiddenStates", "MLLMEncoder", "Qwen25VLEncoder", "load_mllm", "FAMILIES"]
