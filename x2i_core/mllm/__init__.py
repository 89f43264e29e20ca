"""MLLM encoders behind one protocol; the family is detected from config.json (never the folder name)."""

from __future__ import annotations

import importlib
import os

from ..errors import X2IFileError
from ..registry import MLLM_FAMILIES, MLLMFamily, family_of_model_type
from .base import ChatTurn, EncodeRequest, HiddenStates, MLLMEncoder
from .chat import ChatEncoder, read_model_config, resolve_dtype
from .qwen25vl import Qwen25VLEncoder

# model_type -> (module, class, needs remote code, what it is): a view of x2i_core.registry.MLLM_FAMILIES.
FAMILIES: dict[str, tuple[str, str, bool, str]] = {
    t: (f.module, f.encoder, f.remote_code, f.description) for f in MLLM_FAMILIES for t in f.model_types}

REMOTE_CODE_RISK = (
    "Loading it runs Python files shipped inside the model folder (trust_remote_code): code from the model's "
    "author runs with your user's rights. Only enable this for folders from a source you trust and whose .py "
    "files you have read."
)


def family_of(path: str | os.PathLike) -> str:
    """The model_type recorded in the folder's config.json."""
    return str(read_model_config(path).get("model_type"))


def encoder_class(model_type: str):
    fam = family_of_model_type(model_type)
    if fam is None:
        raise KeyError(model_type)
    return _encoder_class(fam)


def _encoder_class(fam: MLLMFamily):
    return getattr(importlib.import_module(f".{fam.module}", __name__), fam.encoder)


def load_mllm(path: str | os.PathLike, *, dtype="auto", device="cpu", trust_remote_code: bool = False,
              quant: str = "none", cpu_matmul: str = "auto") -> MLLMEncoder:
    """Load an MLLM folder as an X2I encoder; ``quant``: none / int8 / bnb8 / bnb4 (see x2i_core.mllm.quant);
    ``cpu_matmul``: auto / torch / onednn (see x2i_core.mllm.packed)."""
    cfg = read_model_config(path)
    model_type = cfg.get("model_type")
    fam = family_of_model_type(model_type)
    if fam is None:
        if model_type == "internvl_chat":
            hint = ("this is the original remote-code InternVL layout; use the transformers-format release of the "
                    "same model (the '-hf' repositories, model_type 'internvl')")
        else:
            hint = "supported: " + "; ".join(f"{' / '.join(f.model_types)} ({f.description})" for f in MLLM_FAMILIES)
        raise X2IFileError(f"MLLM folder '{os.fspath(path)}' holds model_type {model_type!r}; {hint}")
    if fam.remote_code and not trust_remote_code:
        raise X2IFileError(
            f"MLLM folder '{os.fspath(path)}' is {fam.description}, which needs 'trust remote code' to be "
            f"switched on. {REMOTE_CODE_RISK} The switch is off by default."
        )
    kwargs = {"trust_remote_code": True} if fam.remote_code else {}
    if fam.remote_code_option:  # read from its files unless the switch asks for the folder's own code
        kwargs = {"trust_remote_code": bool(trust_remote_code)}
    return _encoder_class(fam).from_pretrained(path, dtype=dtype, device=device, quant=quant, cpu_matmul=cpu_matmul,
                                               **kwargs)


__all__ = ["ChatEncoder", "ChatTurn", "EncodeRequest", "HiddenStates", "MLLMEncoder", "Qwen25VLEncoder", "load_mllm",
           "FAMILIES", "REMOTE_CODE_RISK", "family_of", "encoder_class", "read_model_config", "resolve_dtype"]
