"""MLLM encoders behind one protocol; the family is detected from config.json (never the folder name)."""

from __future__ import annotations

import importlib
import os

from ..errors import X2IFileError
from .base import ChatTurn, EncodeRequest, HiddenStates, MLLMEncoder
from .chat import ChatEncoder, read_model_config, resolve_dtype
from .qwen25vl import Qwen25VLEncoder

# model_type -> (module, class, needs remote code, what it is)
FAMILIES: dict[str, tuple[str, str, bool, str]] = {
    "qwen2_5_vl": ("qwen25vl", "Qwen25VLEncoder", False, "Qwen2.5-VL-3B/7B-Instruct"),
    "qwen2_5_omni": ("qwen25omni", "Qwen25OmniEncoder", False, "Qwen2.5-Omni-3B/7B (thinker)"),
    "qwen2_5_omni_thinker": ("qwen25omni", "Qwen25OmniEncoder", False, "Qwen2.5-Omni thinker"),
    "internvl": ("internvl", "InternVLEncoder", False, "InternVL2.5/3 (-hf transformers format)"),
    "minicpmo": ("minicpmo", "MiniCPMOEncoder", True, "MiniCPM-o-2.6 (remote code)"),
}

REMOTE_CODE_RISK = (
    "Loading it runs Python files shipped inside the model folder (trust_remote_code): code from the model's "
    "author runs with your user's rights. Only enable this for folders from a source you trust and whose .py "
    "files you have read."
)


def family_of(path: str | os.PathLike) -> str:
    """The model_type recorded in the folder's config.json."""
    return str(read_model_config(path).get("model_type"))


def encoder_class(model_type: str):
    module, cls, _, _ = FAMILIES[model_type]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def load_mllm(path: str | os.PathLike, *, dtype="auto", device="cpu", trust_remote_code: bool = False,
              quant: str = "none", cpu_matmul: str = "auto") -> MLLMEncoder:
    """Load an MLLM folder as an X2I encoder; ``quant``: none / int8 / bnb8 / bnb4 (see x2i_core.mllm.quant);
    ``cpu_matmul``: auto / torch / onednn (see x2i_core.mllm.packed)."""
    cfg = read_model_config(path)
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        if model_type == "internvl_chat":
            hint = ("this is the original remote-code InternVL layout; use the transformers-format release of the "
                    "same model (the '-hf' repositories, model_type 'internvl')")
        else:
            hint = "supported: " + "; ".join(f"{k} ({v[3]})" for k, v in FAMILIES.items())
        raise X2IFileError(f"MLLM folder '{os.fspath(path)}' holds model_type {model_type!r}; {hint}")
    remote = FAMILIES[model_type][2]
    if remote and not trust_remote_code:
        raise X2IFileError(
            f"MLLM folder '{os.fspath(path)}' is {FAMILIES[model_type][3]}, which needs 'trust remote code' to be "
            f"switched on. {REMOTE_CODE_RISK} The switch is off by default."
        )
    cls = encoder_class(model_type)
    kwargs = {"trust_remote_code": True} if remote else {}
    return cls.from_pretrained(path, dtype=dtype, device=device, quant=quant, cpu_matmul=cpu_matmul, **kwargs)


__all__ = ["ChatEncoder", "ChatTurn", "EncodeRequest", "HiddenStates", "MLLMEncoder", "Qwen25VLEncoder", "load_mllm",
           "FAMILIES", "REMOTE_CODE_RISK", "family_of", "encoder_class", "read_model_config", "resolve_dtype"]
