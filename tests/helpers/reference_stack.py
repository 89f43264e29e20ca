"""The reference's own software stack as an oracle: run as a script with the side folder made by
``make refstack`` first on ``PYTHONPATH`` (transformers 4.49.0, tokenizers 0.21.0, qwen-vl-utils 0.0.10 -
the versions the released AlignNets were computed with), beside this environment's torch.

Nothing here imports x2i_core: the recipes are the reference code's calls, written from its sources
(``utils/datamodule_qwenvl.py`` for training, ``x2i_comfyui/model.py`` for its ComfyUI nodes,
``infer/inference_qwenvl.py`` for its scripts).

    python reference_stack.py build OUT_DIR VOCAB_DIR TEMPLATE_FILE   # a tiny Qwen2.5-VL saved by 4.49
    python reference_stack.py run JOB.json                            # hidden states of every case

The reference trained on CUDA with SDPA, where transformers 4.49 "unmasks" fully masked query rows
(``AttentionMaskConverter._unmask_unattended``, applied only when the mask lives on cuda/xpu).  On a CPU
``--mask cuda`` (the default) applies that same step to the 4-D mask ``_update_causal_mask`` returns -
the only device-dependent branch on this path; ``--mask cpu`` leaves 4.49's CPU behaviour.

Videos: the reference passes a file path to qwen-vl-utils, which decodes it with decord.  decord has no
wheel here, so a stand-in ``decord`` module serves the job's frames (an ``.npy`` array ``[T, H, W, 3]``
uint8 with its frame rate); qwen-vl-utils' own frame sampling and resizing then run unchanged.
"""

import json
import os
import sys
import types

import numpy as np
import torch


def _install_decord_stand_in():
    class VideoReader:
        def __init__(self, path, *args, **kwargs):
            with open(path + ".json", encoding="utf-8") as fh:
                self._fps = float(json.load(fh)["fps"])
            self._frames = np.load(path)

        def __len__(self):
            return len(self._frames)

        def get_avg_fps(self):
            return self._fps

        def get_batch(self, idx):
            frames = self._frames[list(idx)]
            return types.SimpleNamespace(asnumpy=lambda: frames)

    module = types.ModuleType("decord")
    module.VideoReader = VideoReader
    module.__spec__ = types.SimpleNamespace(name="decord", loader=None, origin="x2i-test-stand-in",
                                            submodule_search_locations=None, parent="")
    sys.modules["decord"] = module


def _check_versions():
    import tokenizers
    import transformers

    if transformers.__version__ != "4.49.0":
        raise SystemExit(f"reference stack expected transformers 4.49.0, found {transformers.__version__} "
                         f"({transformers.__file__}); run 'make refstack'")
    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "torch": torch.__version__}


def build(out_dir, vocab_dir, template_file, seed=0):
    """A tiny random Qwen2.5-VL in the released layout (flat config), tokenizer = the real Qwen2.5 one."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )

    _check_versions()
    with open(template_file, encoding="utf-8") as fh:
        template = fh.read()
    tok = AutoTokenizer.from_pretrained(vocab_dir)
    tok.chat_template = template
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                                    "<|video_pad|>")}
    config = Qwen2_5_VLConfig(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=32768, max_window_layers=2, hidden_act="silu",
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_chans": 3,
                       "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2,
                       "hidden_act": "silu"},
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    # The released config.json spells M-RoPE as {"type": "mrope", ...} (4.49 rewrites it to "default" on save).
    path = os.path.join(out_dir, "config.json")
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    saved["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(saved, fh, indent=2)
    return out_dir


def _emulate_cuda_unmask(model_class=None):
    """4.49 on CUDA: fully masked query rows of the SDPA 4-D mask attend to every key (``model_class``: the
    decoder whose ``_update_causal_mask`` builds the mask; default Qwen2.5-VL's)."""
    from transformers.modeling_attn_mask_utils import AttentionMaskConverter

    if model_class is None:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as model_class

    original = model_class._update_causal_mask

    def update(self, attention_mask, input_tensor, cache_position, past_key_values, output_attentions=False):
        mask = original(self, attention_mask, input_tensor, cache_position, past_key_values, output_attentions)
        if (mask is not None and mask.dim() == 4 and self.config._attn_implementation == "sdpa"
                and attention_mask is not None and not output_attentions):
            mask = AttentionMaskConverter._unmask_unattended(mask, torch.finfo(input_tensor.dtype).min)
        return mask

    model_class._update_causal_mask = update


def _media(case):
    images = case.get("images") or []
    video = case.get("video")
    return images, ([video] if video else [])


def inputs_training(processor, case):
    """utils/datamodule_qwenvl.py: the dict as one text item, chat template, left padding to 512."""
    instructions = {"Text input": case["text"], "Instruction editing description": "no", "image input": "no"}
    message = [{"role": "user", "content": [{"type": "text", "text": str(instructions)}]}]
    prompt = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], images=None, videos=None, padding="max_length", max_length=512, truncation=True,
                     return_tensors="pt")


def inputs_comfyui(processor, case):
    """x2i_comfyui/model.py ``QwenVL2_5.encode``."""
    from qwen_vl_utils import process_vision_info

    images, videos = _media(case)
    images, videos = images or None, videos or None
    text = case.get("text")
    instructions = {"Text input": "" if text is None else text, "Instruction editing description": "",
                    "image input": "no" if videos is None and images is None else "yes"}
    message = [{"role": "user", "content": []}]
    for image in images or []:
        message[0]["content"].append({"type": "image", "image": image, "max_pixels": 224 * 224})
    for video in videos or []:
        message[0]["content"].append({"type": "video", "video": video, "max_pixels": 128 * 128, "fps": 1.0})
    image_inputs = video_inputs = None
    if images is not None or videos is not None:
        image_inputs, video_inputs = process_vision_info(message)
    message[0]["content"].append({"type": "text", "text": str(instructions)})
    prompt = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    first = processor(text=[prompt], images=None if images is None else image_inputs,
                      videos=None if videos is None else video_inputs, return_tensors="pt")
    max_len = max(int(first.input_ids.shape[1] * 1.3), 512)
    return processor(text=[prompt], images=None if images is None else image_inputs,
                     videos=None if videos is None else video_inputs, padding="max_length", max_length=max_len,
                     return_tensors="pt")


def inputs_scripts(processor, case):
    """infer/inference_qwenvl.py ``get_qwen_inputs_embeds``."""
    from PIL import Image
    from qwen_vl_utils import process_vision_info

    images, videos = _media(case)
    message = [{"role": "user", "content": []}]
    image_list = []
    for image in images:
        image_input = Image.open(image).convert("RGB").resize(size=(128, 128))
        message[0]["content"].append({"type": "image", "image": image_input})
        image_list.append(image_input)
    video_inputs = None
    if videos:
        message[0]["content"].append({"type": "video", "video": videos[0], "max_pixels": 128 * 128, "fps": 1.0})
        _, video_inputs = process_vision_info(message)
    if case.get("text") is not None:
        message[0]["content"].append({"type": "text", "text": case["text"]})
    prompt = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], images=None if len(image_list) == 0 else image_list, videos=video_inputs,
                     padding="max_length", max_length=512, truncation=True, return_tensors="pt")


RECIPES = {"training": inputs_training, "comfyui": inputs_comfyui, "scripts": inputs_scripts}


def multi_turn(model, processor, case):
    """infer/inference_multi_turn.py: each user turn = an image at 256x256 + the dict ('', 'yes'); the MLLM
    answers (max_new_tokens=64, the folder's generation settings), the answer becomes an assistant turn; the
    AlignNet input of a turn = prefill states ++ the states of the generated tokens."""
    from PIL import Image
    from qwen_vl_utils import process_vision_info

    message, answers, states = [], [], None
    for turn in case["turns"]:
        instructions = {"Text input": turn["text"], "Instruction editing description": "", "image input": "yes"}
        image = Image.open(turn["image"]).convert("RGB").resize(size=(256, 256))
        message.append({"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": str(instructions)}]})
        text = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        image_inputs, video_inputs = process_vision_info(message)
        inputs = processor(text=[text], images=image_inputs, videos=video_inputs, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=64, output_hidden_states=True,
                                   return_dict_in_generate=True)
        trimmed = [out[len(inp):] for inp, out in zip(inputs.input_ids, generated[0])]
        answer = processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        message.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        answers.append(answer)
        steps = [torch.cat(h) for h in generated["hidden_states"][1:]]
        prefill = torch.cat(generated["hidden_states"][0]).unsqueeze(0)
        states = torch.cat([prefill, torch.cat(steps, dim=1).unsqueeze(0)], dim=2) if steps else prefill
    return answers, states


@torch.no_grad()
def run(job_file):
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    versions = _check_versions()
    with open(job_file, encoding="utf-8") as fh:
        job = json.load(fh)
    _install_decord_stand_in()
    if job.get("mask", "cuda") == "cuda":
        _emulate_cuda_unmask()
    device = job.get("device", "cpu")  # "cuda": 4.49 then takes its own CUDA mask path (use mask "native")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(job["model"], torch_dtype=torch.float32).eval()
    model.to(device)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    tensors, meta = {}, {}
    for case in job["cases"]:
        recipe = case["recipe"]
        if recipe == "multiturn":
            answers, states = multi_turn(model, AutoProcessor.from_pretrained(job["model"]), case)
            tensors[f"{case['id']}.hidden"] = states.contiguous()
            meta[case["id"]] = json.dumps(answers)
            continue
        # The training code loads its processor with padding_side='left'; the inference code with the default.
        processor = AutoProcessor.from_pretrained(job["model"], **({"padding_side": "left"} if recipe == "training"
                                                                   else {}))
        inputs = RECIPES[recipe](processor, case)
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(inputs).items()}
        out = model.generate(**inputs, max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True,
                             do_sample=False)
        key = case["id"]
        tensors[f"{key}.hidden"] = torch.stack(out["hidden_states"][0], dim=1).cpu().contiguous()
        inputs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        tensors[f"{key}.input_ids"] = inputs["input_ids"].contiguous()
        tensors[f"{key}.attention_mask"] = inputs["attention_mask"].contiguous()
        positions, _ = model.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"),
                                            inputs.get("video_grid_thw"), inputs.get("second_per_grid_ts"),
                                            inputs["attention_mask"])
        tensors[f"{key}.positions"] = positions.contiguous()
        for name in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
                     "second_per_grid_ts"):
            if inputs.get(name) is not None:
                value = inputs[name]
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"{key}.{name}"] = value.contiguous()
        meta[key] = recipe
    save_file(tensors, job["out"], metadata={"versions": json.dumps(versions), "cases": json.dumps(meta),
                                             "mask": job.get("mask", "cuda"), "device": str(device)})


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(*sys.argv[2:5])
    elif sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}; expected build or run")
    print("ok", file=sys.stderr)
    os._exit(0)
