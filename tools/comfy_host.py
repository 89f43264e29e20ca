"""The command line of the ComfyUI test host, and ``make demo`` (dev tooling, not part of the pack).

    python tools/comfy_host.py demo [WORKFLOW]        run a shipped workflow (default
                                                      workflows/x2i_text2image.json) on the tiny
                                                      models; prints the PNG path
    python tools/comfy_host.py object-info OUT.json   save a live server's /object_info
    python tools/comfy_host.py inprocess SPEC.json    run API prompts with ComfyUI's executor
                                                      in this process (see comfy_inprocess)
    python tools/comfy_host.py fetch                  fetch the ComfyUI source tree; prints its path

The host itself lives in the modules by job: ``comfy_fetch`` (download/unpack of
ComfyUI, the base folder, sample media), ``comfy_server`` (the server and its
client), ``comfy_workflow`` (UI -> API format, tiny-model prompts) and
``comfy_inprocess`` (the in-process executor harness).  Their public names are
re-exported here for older imports (``from tools.comfy_host import ...``).
"""

from __future__ import annotations

import os
import shutil
import sys

if not __package__:  # run as a script: import the tools as the package they are
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.comfy_fetch import (
    COMFY_VERSION,
    PACK_LINK_NAME,
    ROOT,
    SAMPLE_IMAGES,
    WHEEL,
    cache_root,
    ensure_comfyui,
    prepare_base,
    write_sample_media,
)
from tools.comfy_inprocess import boot_in_process, run_in_process
from tools.comfy_server import ComfyServer, PromptRejected, dump_object_info, execution_error, free_port
from tools.comfy_workflow import load_workflow, point_at_tiny, ui_to_api

__all__ = [
    "COMFY_VERSION", "PACK_LINK_NAME", "ROOT", "SAMPLE_IMAGES", "WHEEL", "cache_root", "ensure_comfyui",
    "prepare_base", "write_sample_media", "boot_in_process", "run_in_process", "ComfyServer", "PromptRejected",
    "dump_object_info", "execution_error", "free_port", "load_workflow", "point_at_tiny", "ui_to_api", "demo",
    "main",
]


def demo(workflow: str = "x2i_text2image.json", out_dir: str | None = None) -> str:
    sys.path.insert(0, ROOT)
    from x2i_core.tiny import default_cache_dir, make_tiny_models

    tiny = make_tiny_models(default_cache_dir(), comfy=True)
    comfy_dir = ensure_comfyui()
    base = os.path.join(cache_root(), "demo-base")
    names = prepare_base(base, tiny)
    with ComfyServer(comfy_dir, base) as server:
        api = point_at_tiny(ui_to_api(load_workflow(workflow), server.object_info()), names, 256, 256, 4)
        entry = server.run(api)
        err = execution_error(entry)
        if err:
            raise RuntimeError(f"workflow failed: {err.get('exception_message')}")
        images = server.output_images(entry)
    if not images:
        raise RuntimeError("the workflow produced no image")
    dest_dir = out_dir or os.path.join(ROOT, "out")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, "x2i_comfyui_demo.png")
    shutil.copyfile(images[0], dest)
    return dest



def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "demo":
        print(demo(*argv[1:2]))
    elif len(argv) == 2 and argv[0] == "inprocess":
        run_in_process(argv[1])
    elif len(argv) == 2 and argv[0] == "object-info":
        print(dump_object_info(argv[1]))
    elif len(argv) >= 1 and argv[0] == "fetch":
        print(ensure_comfyui())
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
