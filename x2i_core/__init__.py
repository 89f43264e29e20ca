"""x2i_core - X2I (arXiv 2503.06134) for FLUX: MLLM encoding, AlignNet, generation.

A standalone library: it never imports ComfyUI.  Heavy dependencies (torch,
transformers, diffusers) are imported by the modules that need them.
"""

__version__ = "0.1.0"

from .errors import X2IError, X2IFileError, X2IInputError, X2IShapeError, X2IUnsafeFileError  # noqa: E402,F401
