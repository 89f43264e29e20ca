"""MiniCPM-o-2.6 by the reference repository's own code, as an oracle: run as a script with the side folder made
by ``make refstack-minicpmo`` (transformers 4.48.0, tokenizers 0.21.0 - the stack the reference README asks for
with MiniCPM) first on ``PYTHONPATH``, beside this environment's torch.

Nothing here imports x2i_core, and no reference code is part of this project: the script reads the ``minicpm/``
folder of a checkout of ``OPPO-Mente-Lab/X2I`` at run time (``tests/helpers/reference_repo.py`` finds one).

    python minicpmo_reference.py REF_MINICPM_DIR OUT_DIR VOCAB_DIR JOB.json RESULT.safetensors

1. builds a tiny random MiniCPM-o folder the way real ones are laid out: the reference's ``.py`` files with an
   ``auto_map`` in ``config.json``, ``tokenizer_config.json`` and ``preprocessor_config.json``; a Qwen2.5
   tokenizer (the real vocabulary ComfyUI ships) with MiniCPM-o's special tokens; the model made by the
   reference's ``MiniCPMO`` class (Qwen2 LLM, SigLIP-NaViT, resampler, Whisper encoder; no TTS) and saved
   with ``save_pretrained`` as safetensors;
2. loads it back as the reference does (``AutoProcessor`` then ``AutoModel``, ``trust_remote_code=True``,
   ``attn_implementation='sdpa'``, fp32) and computes every case of the job with the reference's own calls:
   the training recipe (``utils/datamodule_minicpm.py``: the dict prompt, the processor's arguments,
   ``generate`` with ``pixel_values=[[]]``) and the inference recipe (``infer/inference_minicpm.py``: tags per
   image and clip, the processor's arguments, ``generate(max_new_tokens=1)``), keeping ``hidden_states[0]``.

Shims on this stack - each changes an import, no arithmetic:

* ``resampler.py`` gets ``from typing import List``: it took ``List`` from ``torch.nn.functional``'s star
  import, which newer torch no longer exports;
* ``soundfile`` and ``librosa`` (imported at module level by ``modeling_minicpmo.py`` / ``utils.py`` for the
  TTS and voice paths, not installed here) are stand-in modules that raise if anything is called.
"""

import json
import os
import sys
import types

import numpy as np
import torch

SOURCES = ("configuration_minicpm.py", "modeling_minicpmo.py", "modeling_navit_siglip.py", "resampler.py",
           "processing_minicpmo.py", "image_processing_minicpmv.py", "tokenization_minicpmo_fast.py", "utils.py")
SHIMS = {"resampler.py": "from typing import List  # x2i test shim: newer torch's functional no longer exports it\n"}
STAND_INS = ("soundfile", "librosa")
SPECIAL = ["<unk>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>",
           "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<|audio_start|>", "<|audio|>",
           "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>", "<|tts_bos|>", "<|tts_eos|>",
           "<|listen|>", "<|speak|>", "<|interrupt|>", "<|vad_start|>", "<|vad_end|>"]
# MiniCPM-o-2.6's chat template (ChatML with a default system message).
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMOConfig", "AutoModel": "modeling_minicpmo.MiniCPMO",
            "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO"}


def _stand_ins():
    for name in STAND_INS:
        module = types.ModuleType(name)

        def _missing(attr, _name=name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            raise RuntimeError(f"x2i test stand-in: {_name}.{attr} is not available")

        module.__getattr__ = _missing
        module.__spec__ = types.SimpleNamespace(name=name, loader=None, origin="x2i-test-stand-in",
                                                submodule_search_locations=None, parent="")
        sys.modules[name] = module


def _check_versions():
    import tokenizers
    import transformers

    if transformers.__version__ != "4.48.0" or not tokenizers.__version__.startswith("0.21."):
        raise SystemExit(f"MiniCPM-o reference stack expected transformers 4.48.0 / tokenizers 0.21, found "
                         f"{transformers.__version__} / {tokenizers.__version__} (make refstack-minicpmo)")


def build(ref_dir, out_dir, vocab_dir, seed=0):
    from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    for name in SOURCES:
        with open(os.path.join(ref_dir, name), encoding="utf-8") as fh:
            src = fh.read()
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as fh:
            fh.write(SHIMS.get(name, "") + src)
    tok = AutoTokenizer.from_pretrained(vocab_dir)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL, "unk_token": "<unk>"})
    tok.chat_template = TEMPLATE
    tok.model_max_length = 8192
    tok.padding_side = "right"
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as fh:
        tcfg = json.load(fh)
    tcfg["tokenizer_class"] = "MiniCPMOTokenizerFast"
    tcfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_minicpmo_fast.MiniCPMOTokenizerFast"]}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(tcfg, fh, indent=2, ensure_ascii=False)
    pre = {"image_processor_type": "MiniCPMVImageProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
           "processor_class": "MiniCPMOProcessor",
           "auto_map": {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor",
                        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
           "max_slice_nums": 9, "scale_resolution": 56, "patch_size": 14, "use_image_id": True,
           "image_feature_size": 8, "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>",
           "slice_end": "</slice>", "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>",
           "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
           "feature_size": 80, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
           "padding_value": 0.0, "padding_side": "right", "return_attention_mask": False}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w", encoding="utf-8") as fh:
        json.dump(pre, fh, indent=2)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    cfg = {"architectures": ["MiniCPMO"], "auto_map": AUTO_MAP, "model_type": "minicpmo", "vocab_size": 151700,
           "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
           "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True, "use_sliding_window": False,
           "sliding_window": 32768, "max_window_layers": 2, "bos_token_id": ids["<|endoftext|>"],
           "eos_token_id": ids["<|im_end|>"], "torch_dtype": "float32", "query_num": 8, "image_size": 448,
           "drop_vision_last_layer": True, "batch_vision_input": True, "use_image_id": True,
           "vision_batch_size": 16, "audio_pool_step": 2, "audio_chunk_length": 1.0, "chunk_input": True,
           "stream_input": False, "init_vision": True, "init_audio": True, "init_tts": False,
           "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv", "scale_resolution": 56},
           "vision_config": {"hidden_size": 32, "image_size": 140, "intermediate_size": 64, "model_type": "siglip",
                             "num_attention_heads": 2, "num_hidden_layers": 3, "patch_size": 14},
           "audio_config": {"model_type": "whisper", "d_model": 32, "encoder_layers": 2,
                            "encoder_attention_heads": 2, "encoder_ffn_dim": 128, "num_mel_bins": 80,
                            "max_source_positions": 1500, "decoder_layers": 1, "decoder_attention_heads": 2,
                            "decoder_ffn_dim": 64, "activation_function": "gelu"}}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)  # the processor's modules first (see x2i docs)
    config = AutoConfig.from_pretrained(out_dir, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            norm = p.dim() == 1 and any(k in name for k in ("norm", "ln_"))
            p.copy_(1.0 + noise if norm else noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained rewrote config.json from the config object; the released layout keeps the source's keys
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    return out_dir


def run(out_dir, job_file, result_file):
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(out_dir, trust_remote_code=True, attn_implementation="sdpa",
                                      torch_dtype=torch.float32, init_vision=True, init_audio=True,
                                      init_tts=False).eval()
    with open(job_file, encoding="utf-8") as fh:
        job = json.load(fh)
    out, info = {}, {"audio_attn": model.config.audio_config._attn_implementation,
                     "vision_attn": model.config.vision_config._attn_implementation,
                     "llm_attn": model.llm.config._attn_implementation}
    for case in job["cases"]:
        if case["recipe"] == "training":
            fields = {"Text input": case["text"], "Instruction editing description": "no", "image input": "no"}
            prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": str(fields)}],
                                                             tokenize=False, add_generation_prompt=True)
            inputs = processor([prompt], images=None, audios=None, max_slice_nums=1, use_image_id=False,
                               chunk_input=True, return_tensors="pt", padding="max_length", max_length=512,
                               sampling_rate=16000, add_special_tokens=True)
            inputs = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask, "pixel_values": [[]]}
            states = model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=1, decode_text=False).hidden_states
            mask = inputs["attention_mask"]
        else:
            content, images, audios = "", [], []
            for path in case.get("images", []):
                images.append(Image.open(path).convert("RGB"))
                content += "(<image>./</image>)\n"
            for path in case.get("audios", []):
                audios.append(np.load(path).astype(np.float32))
                content += "(<audio>./</audio>)\n"
            content += case.get("text") or ""
            prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                             add_generation_prompt=True)
            inputs = processor(text=[prompt], images=[images] if images else None, audios=[audios] if audios else None,
                               max_slice_nums=1, use_image_id=False, chunk_input=True, return_tensors="pt",
                               max_length=32768, sampling_rate=16000, add_special_tokens=True)
            inputs.pop("image_sizes")
            states = model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=1, decode_text=False).hidden_states
            mask = inputs["attention_mask"]
        out[case["id"]] = torch.stack(tuple(states[0]), dim=1).contiguous()
        out[case["id"] + ".mask"] = mask.to(torch.long).contiguous()
        out[case["id"] + ".ids"] = inputs["input_ids"].to(torch.long).contiguous()
    save_file(out, result_file, metadata={"info": json.dumps(info)})


if __name__ == "__main__":
    ref, folder, vocab, job_path, result = sys.argv[1:6]
    _check_versions()
    import transformers.generation.utils  # noqa: F401  (transformers probes for the real packages at import)

    _stand_ins()
    build(ref, folder, vocab)
    run(folder, job_path, result)
