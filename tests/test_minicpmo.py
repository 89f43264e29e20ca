"""MiniCPM-o's optional remote-code path (trust_remote_code=True); the default weights-only path is tested
against the reference's own code in tests/test_minicpmo_oracle.py and on the tiny model in tests/test_family_minicpmo.py.

The real MiniCPM-o code ships inside its model folder and cannot be fetched here, so the switch-on path runs
on a small *stand-in* folder written below: remote-code files with the public interface our encoder relies on
(``AutoModel`` -> a model with ``.llm`` and ``generate(..., tokenizer=, decode_text=)`` returning prefill
``hidden_states``; ``AutoProcessor`` taking ``text`` / ``images`` / ``audios``).  It proves the loader, the
switch, the prompt recipes and the hidden-state stacking - not MiniCPM-o's own vision/audio code.

Where the 'training' preset depends on it, the stand-in processor treats its arguments as MiniCPM-o's does:
leftover keyword arguments (``padding``, ``add_special_tokens``) go to ``tokenizer.encode()``, ``max_length``
only truncates, ids come back as int32 and the mask marks only the processor's own (left) batch padding.  It
also records every call, so the tests can compare the arguments with the reference trainer's.
"""

import json
import os

import numpy as np
import pytest
import torch

from x2i_core.errors import X2IFileError, X2IInputError
from x2i_core.mllm import ChatTurn, EncodeRequest, load_mllm

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

    def generate(self, input_ids=None, attention_mask=None, tokenizer=None, max_new_tokens=1, decode_text=True,
                 **media):
        assert len(input_ids) == len(media["pixel_values"])  # as MiniCPM-o's generate
        self.seen = {k: (len(v[0]) if isinstance(v, list) and v else v) for k, v in media.items()}
        self.seen_args = {"tokenizer": tokenizer, "max_new_tokens": max_new_tokens, "decode_text": decode_text}
        # as MiniCPM-o: the model embeds the ids itself and its llm generates from the embeddings
        embeds = self.llm.get_input_embeddings()(input_ids)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                output_hidden_states=True, return_dict_in_generate=True, do_sample=False,
                                pad_token_id=0)
        return out if decode_text is False else (["decoded text"], out)
'''
PROCESSING_PY = '''
import torch
from transformers import BatchFeature, ProcessorMixin


class MiniCPMOProcessor(ProcessorMixin):
    attributes = ["tokenizer"]
    tokenizer_class = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    mask_tokenizer_pads = False  # a test switch: also mask the tokenizer's pad tokens in the returned mask

    def __call__(self, *args, **kwargs):
        self.__dict__.setdefault("calls", []).append((args, dict(kwargs)))  # read back by the tests
        return self.process(*args, **kwargs)

    def process(self, text=None, images=None, audios=None, return_tensors="pt", max_slice_nums=None,
                use_image_id=None, chunk_input=None, max_length=None, sampling_rate=None, **kwargs):
        # as MiniCPM-o's processor: leftover kwargs reach tokenizer.encode(), max_length only truncates, rows are
        # left-padded with 0 to the batch's longest and the mask marks that padding only
        rows = [self.tokenizer.encode(t, **kwargs) for t in text]
        rows = [r[:max_length] if max_length is not None else r for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int32)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.int32)
            mask[i, width - len(r):] = True
        if self.mask_tokenizer_pads:
            mask &= ids != self.tokenizer.pad_token_id
        enc = {"input_ids": ids, "attention_mask": mask}
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
    cfg = {"model_type": "minicpmo", "architectures": ["MiniCPMO"], "vocab_size": len(tok), "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMOConfig",
                        "AutoModel": "modeling_minicpmo.MiniCPMO"}}
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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    marker = str(tmp_path_factory.mktemp("marker") / "ran.txt")
    os.environ["X2I_STANDIN_MARKER"] = marker
    folder = write_standin(str(tmp_path_factory.mktemp("minicpmo") / "MiniCPM-o-2_6"))
    os.remove(marker)  # building it ran the code once; the tests start from a clean marker
    return folder, marker


def test_switch_off_reads_the_files_and_never_runs_the_folder_code(standin):
    """With the switch off a MiniCPM-o folder is read from its files (x2i_core.mllm.minicpmo_native); this stand-in
    is not a real MiniCPM-o layout (no preprocessor config, no towers), so it is refused by name - and nothing of
    its Python ran."""
    folder, marker = standin
    with pytest.raises(X2IFileError, match="preprocessor_config.json"):
        load_mllm(folder)
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
        tokenize=True, add_generation_prompt=True, return_dict=False)
    assert hs.hidden.shape[2] == len(ids)
    # equals the stand-in model's own prefill
    with torch.no_grad():
        ref = enc.model.llm(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert (hs.hidden - torch.stack(ref, 1)).abs().max().item() <= 1e-5
    with pytest.raises(X2IInputError, match="placeholder"):
        enc.encode(EncodeRequest(text="(<image>./</image>) sneaky"))


# The reference trainer's processor call (OPPO-Mente-Lab/X2I utils/datamodule_minicpm.py), besides the prompt list.
REFERENCE_TRAINING_KWARGS = {"images": None, "audios": None, "max_slice_nums": 1, "use_image_id": False,
                             "chunk_input": True, "return_tensors": "pt", "padding": "max_length", "max_length": 512,
                             "sampling_rate": 16000, "add_special_tokens": True}


@pytest.fixture(scope="module")
def loaded(standin):
    folder, _ = standin
    return load_mllm(folder, dtype="fp32", trust_remote_code=True)


def reference_training_prompt(tok, caption, instruction="no"):
    fields = {"Text input": caption, "Instruction editing description": instruction, "image input": "no"}
    return tok.apply_chat_template([{"role": "user", "content": str(fields)}], tokenize=False,
                                   add_generation_prompt=True)


def reference_training_states(enc, prompt):
    """What the reference trainer computes: the folder's processor, then the model's generate -> the prefill
    states of every layer.  The trainer asks for up to 2048 new tokens; 8 here (2048 is slow on CPU) still shows
    that the tokens generated after the prefill do not change its states."""
    inputs = enc.processor.process([prompt], **REFERENCE_TRAINING_KWARGS)
    with torch.no_grad():
        out = enc.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 pixel_values=[[]], tokenizer=enc.processor.tokenizer, max_new_tokens=8,
                                 decode_text=False)
    assert len(out.hidden_states) == 8
    return torch.stack(out.hidden_states[0], 1), inputs["attention_mask"]


def test_training_preset_is_the_reference_training_recipe(loaded):
    enc = loaded
    proc, tok = enc.processor, enc.processor.tokenizer
    proc.calls = []
    hs = enc.encode(EncodeRequest(text="a red fox's den"), preset="training")
    prompt = reference_training_prompt(tok, "a red fox's den")
    assert ("{'Text input': \"a red fox's den\", 'Instruction editing description': 'no', 'image input': 'no'}"
            in prompt)
    # (1) the prompt text and (2) the processor arguments are the trainer's, and the processor ran once
    assert proc.calls == [(([prompt],), REFERENCE_TRAINING_KWARGS)]
    # (3) the folder's processor padded: the tokenizer right-padded to its model_max_length, max_length cut to 512
    assert hs.preset == "training" and hs.hidden.shape == (1, 4, 512, 64)
    n = len(tok.encode(prompt))
    assert 10 < n < 512
    # the model was called as the trainer calls it: ids + mask + one empty image list per row, no other media
    assert enc.model.seen == {"pixel_values": 0}
    assert enc.model.seen_args == {"tokenizer": tok, "max_new_tokens": 1, "decode_text": False}
    # equal to the reference computation
    ref, mask = reference_training_states(enc, prompt)
    assert ref.shape == hs.hidden.shape and torch.equal(hs.hidden, ref)
    assert hs.attention_mask.dtype == torch.long and torch.equal(hs.attention_mask, mask.long())
    assert hs.lengths == [512]  # MiniCPM-o's mask marks its batch padding only: all 512 rows count as real
    # the first n rows are the prompt's own (right padding, causal attention)
    with torch.no_grad():
        own = enc.model.llm(torch.tensor([tok.encode(prompt)]), output_hidden_states=True).hidden_states
    assert (hs.hidden[:, :, :n] - torch.stack(own, 1)).abs().max().item() <= 1e-5
    # padding ourselves (the tokenizer to exactly 512, its mask zero on the pads) gives other states
    alt = tok([prompt], padding="max_length", max_length=512, return_tensors="pt")
    with torch.no_grad():
        out = enc.model.generate(input_ids=alt["input_ids"], attention_mask=alt["attention_mask"], pixel_values=[[]],
                                 tokenizer=tok, max_new_tokens=1, decode_text=False)
    assert (torch.stack(out.hidden_states[0], 1) - hs.hidden).abs().max().item() > 1e-3


def test_training_preset_takes_the_processors_mask_and_the_instruction(loaded):
    enc = loaded
    proc, tok = enc.processor, enc.processor.tokenizer
    proc.calls = []
    proc.mask_tokenizer_pads = True  # a folder whose processor masks the pads: the mask must be the processor's
    try:
        hs = enc.encode(EncodeRequest(text="a fox", instruction="make it blue"), preset="Training")
        prompt = reference_training_prompt(tok, "a fox", "make it blue")
        assert proc.calls == [(([prompt],), REFERENCE_TRAINING_KWARGS)]
        ref, mask = reference_training_states(enc, prompt)
    finally:
        proc.mask_tokenizer_pads = False
    n = len(tok.encode(prompt))
    assert hs.lengths == [n] and int(mask.sum()) == n and int(hs.attention_mask[0, n:].sum()) == 0
    assert torch.equal(hs.attention_mask, mask.long()) and torch.equal(hs.hidden, ref)
    # the call the encode node and the pipeline make (resolutions, prefill, pad_rows) reaches the recipe
    hs2 = enc.encode(EncodeRequest(text="a fox", instruction="make it blue"), preset="training", image_size=None,
                     video_size=None, prefill="off", pad_rows="reference")
    assert hs2.preset == "training" and hs2.lengths == [512]
    assert torch.equal(enc.encode_text("a fox", "training").hidden,
                       enc.encode(EncodeRequest(text="a fox"), preset="training").hidden)


def test_training_preset_refuses_media_chats_and_empty_captions(loaded):
    from PIL import Image

    enc = loaded
    enc.processor.calls = []
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    tone = (np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440) * 0.3).astype(np.float32)
    for req, what in ((EncodeRequest(text="a fox", images=[img]), "images"),
                      (EncodeRequest(text="a fox", videos=[[img, img]]), "video"),
                      (EncodeRequest(text="a fox", audios=[(tone, 16000)]), "audio"),
                      (EncodeRequest(text="a fox", images=img, audios=(tone, 16000)), "images and audio")):
        with pytest.raises(X2IInputError, match="preset 'training' is text-only") as exc:
            enc.encode(req, preset="training")
        assert f"but {what} were given" in str(exc.value) and "default preset" in str(exc.value)
    with pytest.raises(X2IInputError, match="preset 'training'.*multi-turn"):
        enc.encode(EncodeRequest(text="a fox", history=[ChatTurn("user", "hi"), ChatTurn("assistant", "hello")]),
                   preset="training")
    for text in (None, ""):
        with pytest.raises(X2IInputError, match="prompt text is empty; the 'training' preset needs a caption"):
            enc.encode(EncodeRequest(text=text), preset="training")
    with pytest.raises(X2IInputError, match="only whitespace"):
        enc.encode(EncodeRequest(text="   "), preset="training")
    with pytest.raises(X2IInputError, match="placeholder"):
        enc.encode(EncodeRequest(text="a (<image>./</image>) fox"), preset="training")
    with pytest.raises(X2IInputError, match="unknown for MiniCPM-o.*'training'"):
        enc.encode(EncodeRequest(text="a fox"), preset="trainig")
    with pytest.raises(X2IInputError, match="pad_rows 'constant' is not available"):
        enc.encode(EncodeRequest(text="a fox"), preset="training", pad_rows="constant")
    with pytest.raises(X2IInputError, match="pad_rows 'bogus' is unknown"):
        enc.encode(EncodeRequest(text="a fox"), preset="training", pad_rows="bogus")
    assert enc.processor.calls == []  # every refusal came before the folder's code ran


def test_default_presets_keep_the_inference_recipe(loaded):
    enc = loaded
    proc, tok = enc.processor, enc.processor.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    first = None
    for preset in (None, "auto", "comfyui", "scripts", "minicpm", "Auto"):
        proc.calls = []
        hs = enc.encode(EncodeRequest(text="a fox"), preset=preset, pad_rows="constant")  # unpadded: no pad rows
        assert hs.preset == "minicpm" and hs.hidden.shape[2] == len(ids) and hs.lengths == [len(ids)]
        ((args, kwargs),) = proc.calls
        assert args == () and kwargs["text"] == [tok.apply_chat_template(
            [{"role": "user", "content": "a fox"}], tokenize=False, add_generation_prompt=True)]
        assert "padding" not in kwargs and kwargs["max_length"] == 32768
        first = hs.hidden if first is None else first
        assert torch.equal(hs.hidden, first)


def test_remote_code_without_hidden_states_is_an_x2i_error(standin, monkeypatch):
    """Remote code whose generate returns no hidden states (as MiniCPM-o's own code does on transformers 4.57,
    its prepare_inputs_for_generation dropping output_hidden_states) is named, not a bare TypeError."""
    import types

    from x2i_core.errors import X2IShapeError

    folder, _ = standin
    enc = load_mllm(folder, dtype="fp32", trust_remote_code=True)
    assert not enc.from_files
    monkeypatch.setattr(enc.model, "generate", lambda **kw: types.SimpleNamespace(hidden_states=(None,)))
    for preset in ("auto", "training"):
        with pytest.raises(X2IShapeError, match="returned no hidden states.*switch trust_remote_code off"):
            enc.encode(EncodeRequest(text="a red fox"), preset=preset)
