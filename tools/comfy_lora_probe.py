"""Apply a LoRA to a FLUX single file with ComfyUI's own code and return one denoiser output.

Run in a subprocess: ``python tools/comfy_lora_probe.py SPEC.json``.  SPEC holds
``comfy_dir, unet, lora, strength, x, sigma, seq, pooled, guidance`` (tensors in a
safetensors file ``inputs``) and ``out``.  Writes the velocity ComfyUI's FLUX
predicts (``[B, 16, H, W]``) and the LoRA keys ComfyUI could not map.
"""

import json
import logging
import os
import sys


def main(spec_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.comfy_inprocess import boot_in_process

    spec = boot_in_process(spec_path, with_nodes=False)
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    not_loaded = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "lora key not loaded" in msg:
                not_loaded.append(msg)

    logging.getLogger().addHandler(Catch())
    inputs = load_file(spec["inputs"])
    model = comfy.sd.load_diffusion_model(spec["unet"], model_options={"dtype": torch.float32})
    if spec.get("lora"):
        lora = comfy.utils.load_torch_file(spec["lora"], safe_load=True)
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, float(spec["strength"]), 0.0)
    mm.load_models_gpu([model])
    with torch.no_grad():
        v = model.model.diffusion_model(inputs["x"], inputs["sigma"], context=inputs["seq"], y=inputs["pooled"],
                                        guidance=inputs["guidance"])
    save_file({"v": v.float().contiguous()}, spec["out"])
    with open(spec["out"] + ".json", "w", encoding="utf-8") as fh:
        json.dump({"not_loaded": not_loaded}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
