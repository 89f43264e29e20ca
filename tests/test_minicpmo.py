"""MiniCPM-o behind the trust-remote-code switch.

The real MiniCPM-o code ships inside its model folder and cannot be fetched here, so the switch-on path runs
on a small *stand-in* folder written below: remote-code files with the public interface our encoder relies on
(``AutoModel`` -> a model with ``.llm`` and ``generate(..., tokenizer=, decode_text=)`` returning prefill
``hidden_states``; ``AutoProcessor`` taking ``text`` / ``images`` / ``audios``).  It proves the loader, the
switch, the prompt recipe and the hidden-state stacking - not MiniCPM-o's own vision/audio code.
"""

import json
import os

import numpy as np
import pytest
import torch

from x2i_core.errors import X2IFileError, X2IInputError
from x2i_core.mllm import EncodeRequest, load_mllm

CONFIG_PY = '''
import os
from transformers import Qwen2Config
open(os.environ["X2I_STANDIN_MARKER"], "a").write("config imported\\\\n")


class MiniCPMOConfig(Qwen2Config):
    model_type = "minicpmo"
'''
MODELING_PY = '''
from transformers import PreTrainedModel, Qwen2ForCausalLM
from .configuration_minicpm import MiniCPMOConfig


class MiniCPMO(PreTrainedModel):
    config_class = MiniCPMOConfig

    def __init__(self, config, init_vision=True, init_audio=True, init_tts=True):
        super().__init__(config)
        self.llm = Qwen2ForCausalLM(config)
        self.seen = None
        self.post_init()

    def generate(self, input_ids=None, attention_mask=None, tokenizer=None, max_new_tokens=1, decode_text=False,
                 **media):
        self.seen = {k: (len(v[0]) if isinstance(v, list) and v else v) for k, v in media.items()}
        return self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 output_hidden_states=True, return_dict_in_generate=True, do_sample=False)
'''
PROCESSING_PY = '''
from transformers import BatchFeature, ProcessorMixin


class MiniCPMOProcessor(ProcessorMixin):
    attributes = ["tokenizer"]
    tokenizer_class = ("Qwen2Tokenizer", "Qwen2TokenizerFast")

    def __call__(self, text=None, images=None, audios=None, return_tensors="pt", max_slice_nums=None,
                 use_image_id=None, chunk_input=None, max_length=None, sampling_rate=None, **kwargs):
        enc = dict(self.tokenizer(text, return_tensors=return_tensors))
        enc["image_sizes"] = [[im.size for im in imgs] for imgs in images] if images else [[]]
        enc["pixel_values"] = images or [[]]
        enc["audio_features"] = audios or [[]]
        return BatchFeature(enc)
'''


def write_standin(folder, seed=0):
    from x2i_core.tiny import build_tokenizer

    os.makedirs(folder, exist_ok=True)
    tok = build_tokenizer(folder)
    tok.save_pretrained(folder)
    cfg = dict(model_type="minicpmo", architectures=["MiniCPMO"], vocab_size=len(tok), hidden_size=64,
               intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=4096, tie_word_embeddings=False,
               auto_map={"AutoConfig": "configuration_minicpm.MiniCPMOConfig", "AutoModel": "modeling_minicpmo.MiniCPMO"})
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(folder, "processor_config.json"), "w") as fh:
        json.dump({"processor_class": "MiniCPMOProcessor",
                   "auto_map": {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor"}}, fh)
    for name, src in (("configuration_minicpm.py", CONFIG_PY), ("modeling_minicpmo.py", MODELING_PY),
                      ("processing_minicpmo.py", PROCESSING_PY)):
        with open(os.path.join(folder, name), "w") as fh:
            fh.write(src)
    # weights: built by the stand-in's own class in a separate process (this test process must not have
    # imported the folder's code before the tests below)
    import subprocess
    import sys

    code = ("import sys, torch; from transformers import AutoConfig; "
            "from transformers.dynamic_module_utils import get_class_from_dynamic_module as g; "
            f"f = {folder!r}; torch.manual_seed({seed}); c = AutoConfig.from_pretrained(f, trust_remote_code=True); "
            "g('modeling_minicpmo.MiniCPMO', f)(c).save_pretrained(f, safe_serialization=True)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    marker = str(tmp_path_factory.mktemp("marker") / "ran.txt")
    os.environ["X2I_STANDIN_MARKER"] = marker
    folder = write_standin(str(tmp_path_factory.mktemp("minicpmo") / "MiniCPM-o-2_6"))
    os.remove(marker)  # building it ran the code once; the tests start from a clean marker
    return folder, marker


def test_switch_off_refuses_before_any_folder_code_runs(standin):
    folder, marker = standin
    with pytest.raises(X2IFileError, match="trust remote code") as exc:
        load_mllm(folder)
    assert "off by default" in str(exc.value) and "your user's rights" in str(exc.value)
    assert not os.path.exists(marker)


def test_switch_on_loads_and_encodes_with_the_reference_recipe(standin):
    folder, marker = standin
    enc = load_mllm(folder, dtype="fp32", trust_remote_code=True)
    assert os.path.exists(marker)  # the folder's code did run, as the switch allows
    assert enc.channels == 4 and enc.hidden_size == 64  # llm layers + 1
    from PIL import Image

    img = Image.new("RGB", (40, 30), (10, 200, 30))
    tone = (np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440) * 0.3).astype(np.float32)
    hs = enc.encode(EncodeRequest(text="a fox", images=[img, img], audios=[(tone, 16000)]))
    assert hs.hidden.shape[:2] == (1, 4) and hs.preset == "minicpm"
    seen = enc.model.seen
    assert seen["pixel_values"] == 2 and seen["audio_features"] == 1 and "image_sizes" not in seen
    # the prompt is the reference's: media tags, then the text, in one user message
    ids = enc.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "(<image>./</image>)\n" * 2 + "(<audio>./</audio>)\n" + "a fox"}],
        tokenize=True, add_generation_prompt=True)
    assert hs.hidden.shape[2] == len(ids)
    # equals the stand-in model's own prefill
    with torch.no_grad():
        ref = enc.model.llm(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert (hs.hidden - torch.stack(ref, 1)).abs().max().item() <= 1e-5
    with pytest.raises(X2IInputError, match="placeholder"):
        enc.encode(EncodeRequest(text="(<image>./</image>) sneaky"))
