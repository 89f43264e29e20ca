import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny model set, built fresh once per test session (no ComfyUI files)."""
    from x2i_core.tiny import make_tiny_models

    return make_tiny_models(str(tmp_path_factory.mktemp("tiny")), comfy=False)


@pytest.fixture(scope="session")
def encoder(tiny):
    from x2i_core.mllm import load_mllm

    return load_mllm(tiny["mllm"], dtype="fp32")


@pytest.fixture(scope="session")
def hf_model(tiny):
    """The full transformers model (with LM head) for the reference recipe."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny["mllm"], dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny["mllm"])
