"""The tiny-model factory: random models with 2 layers and small widths, written in the on-disk formats users
download, for the tests, the demo and the benchmarks' shapes.

* :mod:`.models` - the Qwen2.5-VL folder, the AlignNet (published and our layout), the diffusers FLUX folder with
  its teacher encoders, ComfyUI's single-file FLUX and TAESD, and :func:`make_tiny_models` (the cached set);
* :mod:`.families` - the other MLLM families (Qwen2.5-Omni, InternVL -hf, MiniCPM-o) in their released layouts;
* :mod:`.parts` - what the builders share: the byte-level BPE tokenizer with Qwen's special tokens, staging
  folders, deterministic weights, the real models' shapes (``shaped_qwen25vl_config``).

The builders are re-exported here (``from x2i_core.tiny import make_tiny_models``).
"""

from .models import (
    QWEN_SPECIAL_TOKENS,
    TINY_VERSION,
    build_alignnet,
    build_flux_diffusers,
    build_qwen25vl,
    build_teacher_text_encoders,
    build_tokenizer,
    comfy_flux_state_dict,
    default_cache_dir,
    make_tiny_models,
    save_published_alignnet,
    taesd_flux_state_dict,
)

__all__ = ["QWEN_SPECIAL_TOKENS", "TINY_VERSION", "build_alignnet", "build_flux_diffusers", "build_qwen25vl",
           "build_teacher_text_encoders", "build_tokenizer", "comfy_flux_state_dict", "default_cache_dir",
           "make_tiny_models", "save_published_alignnet", "taesd_flux_state_dict"]
