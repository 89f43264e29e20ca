import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # tools/ (the ComfyUI host harness)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fused loss kernels run under Triton's interpreter on CPU; it must be chosen
# before anything imports triton (diffusers does).
if not os.environ.get("X2I_NO_TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_collection_modifyitems(config, items):
    """Safety net for the `comfy` marker (pyproject.toml): a test that requests the ComfyUI `host` fixture,
    directly or through another fixture, starts the real server, so it is `comfy` even if its module forgot
    the mark - `make test-fast` (-m "not comfy ...") must never start the host."""
    for item in items:
        if "host" in getattr(item, "fixturenames", ()) and item.get_closest_marker("comfy") is None:
            item.add_marker(pytest.mark.comfy)


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
    return model, AutoProcessor.from_pretrained(tiny["mllm"], use_fast=False)  # the slow processor, as 4.49 ran


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """A real ComfyUI server (the stack's host: v0.28.1 or v0.3.75) with the pack and the tiny models."""
    import json

    from helpers.comfy import comfy_host_dir
    from tools.comfy_fetch import prepare_base
    from tools.comfy_server import ComfyServer
    from x2i_core.tiny import build_alignnet, default_cache_dir, make_tiny_models

    comfy_dir = comfy_host_dir()
    tiny = make_tiny_models(default_cache_dir(), comfy=True)
    base = str(tmp_path_factory.mktemp("comfy-base"))
    names = prepare_base(base, tiny)
    # A folder that is not a Qwen2.5-VL model, and an AlignNet for another MLLM.
    other = os.path.join(base, "models", "mllm", "not-a-qwen")
    os.makedirs(other)
    with open(os.path.join(other, "config.json"), "w") as fh:
        json.dump({"model_type": "llama", "hidden_size": 64}, fh)
    # A MiniCPM-o folder with remote-code files (that would leave a marker if imported) but no tokenizer or weights.
    remote = os.path.join(base, "models", "mllm", "minicpmo-remote")
    os.makedirs(remote)
    with open(os.path.join(remote, "config.json"), "w") as fh:
        json.dump({"model_type": "minicpmo", "architectures": ["MiniCPMO"],
                   "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMOConfig",
                                "AutoModel": "modeling_minicpmo.MiniCPMO"}}, fh)
    for mod in ("configuration_minicpm.py", "modeling_minicpmo.py"):
        with open(os.path.join(remote, mod), "w") as fh:
            fh.write(f"open({os.path.join(base, 'remote-code-ran')!r}, 'w').write('ran')\n")
    build_alignnet(channels=29, hidden=64, seed=5).save(os.path.join(base, "models", "x2i", "alignnet-7b-like.safetensors"))
    names["lora"] = "tiny-flux-lora.safetensors"
    _random_flux_lora(os.path.join(base, "models", "loras", names["lora"]))
    server = ComfyServer(comfy_dir, base).start()
    yield {"server": server, "names": names, "base": base, "tiny": tiny, "comfy_dir": comfy_dir}
    server.stop()


def _random_flux_lora(path, rank=4, hidden=3072, seed=0):
    """A small deterministic LoRA (diffusers/PEFT keys) for the stock-loadable tiny FLUX."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "ff.net.0.proj"):
        out_f = hidden * 4 if name == "ff.net.0.proj" else hidden
        key = f"transformer.transformer_blocks.0.{name}"
        sd[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.02
        sd[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.02
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
