"""ComfyUI's own executor inside a test process (dev tooling, not part of the pack).

* ``boot_in_process(spec)`` - ComfyUI started in this process (CPU, the spec's
  base directory, custom nodes loaded); the probes in ``tools/`` build on it.
* ``run_in_process(spec)`` - API prompts run by ComfyUI's ``PromptExecutor``
  (``python tools/comfy_host.py inprocess SPEC.json``, in a subprocess): captured
  node outputs and facts (times, per-node times, FLUX calls, MLLM forwards,
  status, errors, model management).
* Fault injection into the pack's MLLM forward (out of memory, cancel, NaN) and
  the harness-only extras a spec may ask for (test nodes, a tiny FLUX ControlNet).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from .comfy_fetch import ROOT


def boot_in_process(spec_path: str, with_nodes: bool = True) -> dict:
    """Read a probe's JSON spec and start ComfyUI inside this process (CPU; the spec's base
    directory; custom nodes loaded when ``with_nodes``).  Returns the spec."""
    import asyncio

    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    sys.path.insert(0, spec["comfy_dir"])
    os.chdir(spec["comfy_dir"])
    from comfy.cli_args import args

    args.cpu = True
    if spec.get("base"):
        args.base_directory = spec["base"]
    if with_nodes:
        import utils.extra_config  # noqa: F401  (must precede nodes: 'utils' is ComfyUI's package)
        import nodes  # isort: skip

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return spec


@contextlib.contextmanager
def _fault(kind: str | None):
    """Fault injection for the bad-input battery, inside the MLLM forward of the pack as loaded by ComfyUI:
    ``oom`` = the forward raises torch.OutOfMemoryError; ``cancel`` = the user presses Cancel while the decoder
    runs (ComfyUI's interrupt flag, what /interrupt sets); ``nan`` = the MLLM returns NaN hidden states;
    ``cancel-processor`` / ``cancel-vision`` = Cancel pressed as the processor starts / as the vision tower's
    first block starts.  Yields a log: when Cancel was pressed and when the pack raised (perf_counter), and how
    many vision blocks and decoder layers ran."""
    log = {"vision_blocks": 0, "decoder_layers": 0}
    if not kind:
        yield log
        return
    import torch

    import comfy.model_management as mm

    (chat,) = [m for n, m in list(sys.modules.items()) if n.endswith("x2i_core.mllm.chat")]
    (prompting,) = [m for n, m in list(sys.modules.items()) if n.endswith("x2i_core.mllm.prompting")]
    original = chat.ChatEncoder.forward_hidden
    original_proc = prompting.ChatPrompt.processor_inputs
    original_check = mm.throw_exception_if_processing_interrupted

    def press():
        if "pressed" not in log:
            log["pressed"] = time.perf_counter()
            mm.interrupt_current_processing(True)

    def faulty(self, batch, **options):
        if kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        if kind == "cancel":
            press()
            return original(self, batch, **options)
        if kind == "nan":
            return torch.full_like(original(self, batch, **options), float("nan"))
        return original(self, batch, **options)

    def processor(self, built):
        if kind == "cancel-processor":
            press()
        return original_proc(self, built)

    def check():
        try:
            original_check()
        except BaseException:
            log.setdefault("raised", time.perf_counter())
            raise

    def counting(module, args):
        name = type(module).__name__
        if name.endswith("DecoderLayer"):
            log["decoder_layers"] += 1
        elif "Vision" in name and name.endswith(("Block", "Layer")):
            log["vision_blocks"] += 1
            if kind == "cancel-vision":
                press()

    chat.ChatEncoder.forward_hidden = faulty
    prompting.ChatPrompt.processor_inputs = processor
    mm.throw_exception_if_processing_interrupted = check
    handle = torch.nn.modules.module.register_module_forward_pre_hook(counting)
    try:
        yield log
    finally:
        handle.remove()
        chat.ChatEncoder.forward_hidden = original
        prompting.ChatPrompt.processor_inputs = original_proc
        mm.throw_exception_if_processing_interrupted = original_check


def _count_flux_calls() -> dict:
    """Count the FLUX transformer's evaluations (calls of ``Flux.forward_orig``; ``rows`` = batch rows, so a
    cond+uncond pair batched together is 1 call, 2 rows): what caching nodes such as EasyCache must save; and
    the stock FLUX ControlNet's (``ControlNetFlux.forward``)."""
    import comfy.ldm.flux.controlnet as flux_controlnet
    import comfy.ldm.flux.model as flux_model

    counter = {"calls": 0, "rows": 0, "controlnet_calls": 0}
    original = flux_model.Flux.forward_orig
    original_cn = flux_controlnet.ControlNetFlux.forward

    def counted(self, img, *args, **kwargs):
        counter["calls"] += 1
        counter["rows"] += int(img.shape[0])
        return original(self, img, *args, **kwargs)

    def counted_cn(self, *args, **kwargs):
        counter["controlnet_calls"] += 1
        return original_cn(self, *args, **kwargs)

    flux_model.Flux.forward_orig = counted
    flux_controlnet.ControlNetFlux.forward = counted_cn
    return counter


def _harness_setup(spec: dict) -> None:
    """What a spec asks for besides the prompts: harness-only nodes (tools/comfy_test_nodes.py, never in the
    shipped pack) and a tiny stock FLUX ControlNet file, made before the prompts are validated."""
    if spec.get("test_nodes"):
        import nodes

        sys.path.insert(0, ROOT)
        from tools.comfy_test_nodes import NODE_CLASS_MAPPINGS as test_nodes

        nodes.NODE_CLASS_MAPPINGS.update(test_nodes)
    if spec.get("controlnet"):  # {"path", "flux"}
        sys.path.insert(0, ROOT)
        from tools.comfy_test_nodes import write_tiny_flux_controlnet

        if not os.path.exists(spec["controlnet"]["path"]):
            write_tiny_flux_controlnet(spec["controlnet"]["path"], spec["controlnet"]["flux"])


def _node_seconds(events: list) -> dict:
    """Per-node wall time from the executor's events: from a node's ``executing`` to its ``executed`` (or to
    the next node's start, for nodes without UI output, which send no ``executed``)."""
    seconds, start = {}, None
    for t, event, node in events + [(time.perf_counter(), "executing", None)]:
        if start is not None and (event == "executing" or node == start[1]):
            seconds[start[1]] = seconds.get(start[1], 0.0) + (t - start[0])
            start = None
        if event == "executing" and node is not None:
            start = (t, node)
    return seconds


def _capture(value, entry, key: str, tensors: dict, facts: dict) -> None:
    """Store one node output: LATENT, IMAGE/MASK, X2I_HIDDEN or CONDITIONING (tensors copied: outputs share
    storage, which safetensors refuses)."""
    import torch

    if isinstance(value, dict) and "samples" in value:  # LATENT
        for name in ("samples", "noise_mask"):
            if name in value:
                tensors[f"{key}.{name}"] = value[name].float().clone()
    elif isinstance(value, torch.Tensor):  # IMAGE / MASK
        tensors[f"{key}.tensor"] = value.float().clone()
    elif hasattr(value, "hidden"):  # X2I_HIDDEN
        tensors[f"{key}.hidden"] = value.hidden.clone()
        tensors[f"{key}.mask"] = value.attention_mask.clone()
        if len(entry.outputs) > 1 and isinstance(entry.outputs[1][0], str):
            facts[f"{key}.answer"] = entry.outputs[1][0]
    else:  # CONDITIONING
        for i, (seq, extra) in enumerate(value):
            tensors[f"{key}.{i}.seq"] = seq.clone()
            tensors[f"{key}.{i}.pooled"] = extra["pooled_output"].clone()
            facts[f"{key}.{i}.guidance"] = extra.get("guidance")
            facts[f"{key}.{i}.extra"] = {k: v for k, v in extra.items()
                                         if isinstance(v, (int, float, str, bool, list, tuple))}


def _managed_models(mm, inner: bool = False) -> list[str]:
    """The pack's models in ComfyUI's loaded list (held in a ``_Holder``; ``inner``: what each holds)."""
    return [type(lm.model.model.inner if inner else lm.model.model).__name__ for lm in mm.current_loaded_models
            if type(lm.model.model).__name__ == "_Holder"]


def run_in_process(spec_path: str) -> None:
    """Run API prompts with ComfyUI's PromptExecutor inside this process (call in a subprocess).

    ``spec``: {"comfy_dir", "base", "prompt", "capture": [node ids], "out": path}, or several prompts
    (``"prompts": {label: prompt}``, ``"capture": {label: [ids]}``) run one after another by one executor
    (its caches carry over, as in a server); optional ``faults``, ``test_nodes``, ``controlnet``. Writes
    ``out`` (safetensors) with the captured outputs and ``out + ".json"`` with facts: per prompt its time,
    per-node times, FLUX calls, status and errors, and ComfyUI's model management before and after
    ``unload_all_models()`` (what ``/free`` calls).
    """
    spec = boot_in_process(spec_path)
    import comfy.model_management as mm
    import execution

    events = []  # (time, event, node id) of the executor's "executing" / "executed" events
    prompts = spec.get("prompts") or {"": spec["prompt"]}
    captures = spec.get("capture", [])
    if not isinstance(captures, dict):
        captures = {"": captures}
    _harness_setup(spec)
    flux_calls = _count_flux_calls()
    sink = _EventSink(events)
    import server

    if getattr(server.PromptServer, "instance", None) is None:  # what nodes reach as PromptServer.instance
        server.PromptServer.instance = sink
    executor = execution.PromptExecutor(sink, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    facts = {"success": True, "messages": [], "errors": {}}
    tensors = {}
    checked = _validated(execution, prompts)
    for label, prompt in prompts.items():
        flux_calls.update(calls=0, rows=0, controlnet_calls=0)
        events.clear()
        t0 = time.perf_counter()
        with _fault(spec.get("faults", {}).get(label)) as fault_log:
            executor.execute(prompt, f"inproc-{label}", {"client_id": "inproc"}, checked[label][2])
        facts.setdefault("fault_log", {})[label] = fault_log
        facts.setdefault("progress_text", {})[label] = list(sink.texts)
        sink.texts.clear()
        facts.setdefault("seconds", {})[label] = time.perf_counter() - t0
        facts.setdefault("node_seconds", {})[label] = _node_seconds(events)
        facts.setdefault("flux_calls", {})[label] = dict(flux_calls)
        _prompt_facts(facts, label, executor, mm)
        if executor.success:
            for nid in captures.get(label, []):
                entry = cache_entry(executor.caches.outputs, nid)
                _capture(entry.outputs[0][0], entry, f"{label}:{nid}" if label else nid, tensors, facts)
    facts["managed_before"] = _managed_models(mm)
    mm.unload_all_models()
    facts["managed_after"] = _managed_models(mm)
    from safetensors.torch import save_file

    if tensors:
        save_file(tensors, spec["out"])
    with open(spec["out"] + ".json", "w", encoding="utf-8") as fh:
        json.dump(facts, fh)


def cache_entry(cache, nid):
    """A cache entry; 0.3.x returns it, later hosts (0.28) make ``get`` a coroutine."""
    import asyncio
    import inspect

    entry = cache.get(nid)
    return asyncio.run(entry) if inspect.isawaitable(entry) else entry


class _EventSink:
    """The executor's server: keeps the node events (they go only to a client, set from each execute()'s
    extra data)."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self, events: list):
        self.events = events
        self.texts: list = []  # (node id, text) of send_progress_text: what a node shows on itself

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text))

    def send_sync(self, event, data=None, *a, **k):
        if event in ("executing", "executed") and isinstance(data, dict):
            self.events.append((time.perf_counter(), event, data.get("node")))


def _validated(execution, prompts: dict) -> dict:
    """Every prompt validated first, so a typo fails before minutes of sampling."""
    import asyncio

    checked = {}
    for label, prompt in prompts.items():
        valid = asyncio.run(execution.validate_prompt("inproc", prompt, None))
        if not valid[0]:
            raise SystemExit(f"invalid prompt {label}: {valid[1]} {valid[3]}")
        checked[label] = valid
    return checked


def _prompt_facts(facts: dict, label: str, executor, mm) -> None:
    """Status, errors, MLLM forwards so far and what stays loaded after one prompt."""
    facts["success"] = facts["success"] and executor.success
    facts["messages"].extend(m[0] for m in executor.status_messages)
    facts.setdefault("status", {})[label] = [m[0] for m in executor.status_messages]
    # the pack's modules live under its folder name
    counters = [m.FORWARD_CALLS for n, m in list(sys.modules.items()) if n.endswith("x2i_core.mllm.cache")]
    facts.setdefault("forward_calls", {})[label] = sum(sum(c.values()) for c in counters)
    facts.setdefault("loaded_after", {})[label] = _managed_models(mm, inner=True)
    if not executor.success:
        facts["errors"][label] = [m[1].get("exception_message") for m in executor.status_messages
                                  if m[0] == "execution_error"]
