"""Every X2I task workflow through ComfyUI's real executor, on the tiny model of every MLLM family that can
read its inputs, with the hidden states it produced equal to the standalone encoder on the same inputs.

(The standalone encoder equals each family's straightforward reference computation - processor +
``generate(max_new_tokens=1)`` prefill - in test_encoder_parity.py / test_family_*.py.)
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.comfy import _expect_node_error, node_of, tiny_api
from tools.comfy_fetch import ROOT
from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfy  # all but test_core_chat_errors run in the host

TOL = 1e-5

# workflow -> what it feeds the MLLM
TASKS = {
    "x2i_text2image.json": {"text"},
    "x2i_multilingual.json": {"text"},
    "x2i_document.json": {"text", "image"},
    "x2i_image2image.json": {"image"},
    "x2i_multi_image.json": {"text", "image"},
    "x2i_edit.json": {"text", "image"},
    "x2i_video2image.json": {"text", "video"},
    "x2i_audio2image.json": {"audio"},
    "x2i_x2image.json": {"text", "image", "video", "audio"},
    "x2i_reasoning2image.json": {"text", "reasoning"},
    "x2i_multi_turn.json": {"text", "image", "chat"},
}
# family -> (its tiny model, what it takes); MiniCPM-o follows the reference's single-message recipe (no chats)
# and X2I reads only its prompt states (no reasoning)
FAMILIES = {"qwen25vl": ("mllm", {"text", "image", "video", "reasoning", "chat"}),
            "omni": ("mllm_omni", {"text", "image", "video", "audio", "reasoning", "chat"}),
            "internvl": ("mllm_internvl", {"text", "image", "video", "reasoning", "chat"}),
            "minicpmo": ("mllm_minicpmo", {"text", "image", "video", "audio"})}


def _cases(names):
    return [(wf, fam) for wf, needs in TASKS.items() for fam, (key, can) in FAMILIES.items()
            if needs <= can and key in names]


def _image(host, name):
    with Image.open(os.path.join(host["base"], "input", name)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 255.0)[None]


def _video(host, name, fps, max_frames):
    import av

    from x2i_core.media import sample_frames

    with av.open(os.path.join(host["base"], "input", name)) as c:
        stream = c.streams.video[0]
        rate = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    return np.stack(sample_frames(frames, rate, fps, max_frames))


def _inputs_of(api, host, node_id):
    """The EncodeRequest the workflow's encode node builds, recomputed from the same files."""
    from x2i_core.audio import load_audio_file
    from x2i_core.mllm import ChatTurn, EncodeRequest

    def media(ins):
        out = {"images": None, "videos": None, "audios": None}
        if "image" in ins:
            src = api[ins["image"][0]]
            if src["class_type"] == "ImageBatch":
                a, b = (api[src["inputs"][k][0]]["inputs"]["image"] for k in ("image1", "image2"))
                out["images"] = torch.cat([_image(host, a), _image(host, b)])
            else:
                out["images"] = _image(host, src["inputs"]["image"])
        if "video" in ins:
            out["videos"] = [_video(host, api[ins["video"][0]]["inputs"]["file"], ins["video_fps"], ins["max_frames"])]
        if "audio" in ins:
            out["audios"] = [load_audio_file(os.path.join(host["base"], "input", api[ins["audio"][0]]["inputs"]["audio"]))]
        return out

    def turns(ref):
        if ref is None:
            return ()
        node = api[ref[0]]["inputs"]
        return turns(node.get("chat")) + (ChatTurn(node["role"], node["text"] or None, **media(node)),)

    ins = api[node_id]["inputs"]
    return EncodeRequest(text=ins["text"] or None, instruction=ins.get("instruction") or None,
                         history=turns(ins.get("chat")), **media(ins))


@pytest.fixture(scope="module")
def executed(host, tmp_path_factory):
    """All (task, family) graphs, run by one in-process PromptExecutor; the encode nodes' outputs captured."""
    prompts, capture, apis = {}, {}, {}
    for wf, fam in _cases(host["names"]):
        api = tiny_api(host, wf, family=fam)
        enc = next(k for k, v in api.items() if v["class_type"] in ("X2IMLLMEncode", "X2IMLLMReason"))
        label = f"{wf[:-5]}@{fam}"
        prompts[label], capture[label], apis[label] = api, [enc], (api, enc)
    tmp = tmp_path_factory.mktemp("tasks")
    out = str(tmp / "hidden.safetensors")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "prompts": prompts,
                                "capture": capture, "out": out}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    from safetensors.torch import load_file

    facts = json.loads(open(out + ".json").read())
    return facts, load_file(out), apis


def test_every_family_has_a_tiny_model_in_the_host(host):
    assert {"mllm", "mllm_omni", "mllm_internvl", "mllm_minicpmo"} <= set(host["names"]), sorted(host["names"])


def test_every_task_runs_through_the_executor_on_every_capable_family(executed, host):
    facts, tensors, apis = executed
    assert facts["success"], facts["errors"]
    assert len(apis) >= len(TASKS)
    assert facts["managed_after"] == []


@pytest.mark.parametrize("case", [f"{wf[:-5]}@{fam}" for wf, needs in TASKS.items()
                                  for fam, (_, can) in FAMILIES.items() if needs <= can])
def test_task_hidden_states_equal_the_standalone_encoder(executed, host, case):
    from x2i_core.mllm import load_mllm

    facts, tensors, apis = executed
    if case not in apis:
        pytest.fail(f"{case}: the tiny model of this family is missing from the test host")
    api, enc_id = apis[case]
    fam = case.split("@")[1]
    encoder = load_mllm(host["tiny"][FAMILIES[fam][0]], dtype="fp32")
    ins = api[enc_id]["inputs"]
    req = _inputs_of(api, host, enc_id)
    if api[enc_id]["class_type"] == "X2IMLLMReason":
        answer, hs = encoder.generate_answer(req, max_new_tokens=ins["max_new_tokens"], temperature=ins["temperature"],
                                             seed=ins["seed"], answer="states")
        assert facts[f"{case}:{enc_id}.answer"] == answer
    else:
        hs = encoder.encode(req, preset=ins["preset"])
    got = tensors[f"{case}:{enc_id}.hidden"]
    assert got.shape == hs.hidden.shape
    assert got.shape[1] == encoder.channels
    diff = (got - hs.hidden).abs().max().item()
    assert diff <= TOL, f"{case}: max abs diff {diff}"
    assert torch.equal(tensors[f"{case}:{enc_id}.mask"], hs.attention_mask)


def test_video_longer_than_the_frame_budget_is_subsampled_over_its_whole_length(host):
    """Documented behaviour: more frames than max_frames -> uniform subsampling to max_frames (not cut)."""
    from x2i_core.media import sample_frames

    frames = list(range(300))  # 10 s at 30 fps
    assert sample_frames(frames, 30.0, 1.0, 768) == [round(i * 299 / 9) for i in range(10)]
    kept = sample_frames(frames, 30.0, 1.0, 4)
    assert len(kept) == 4 and kept[0] == 0 and kept[-1] == 299
    # Through the node: a 30-frame batch at 1 fps with max_frames 2 encodes like its two sampled frames.
    s = host["server"]
    api = tiny_api(host, "x2i_video2image.json")
    enc = node_of(api, "X2IMLLMEncode")
    video_node = api[enc]["inputs"].pop("video")[0]
    del api[video_node]
    api["90"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    api["91"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["90", 0], "amount": 30}}
    api[enc]["inputs"].update({"frames": ["91", 0], "frames_fps": 30.0, "max_frames": 2})
    entry = s.run(api)
    assert execution_error(entry) is None, execution_error(entry)


def test_task_bad_inputs_are_clear_node_errors(host):
    # audio given to a model without audio support
    api = tiny_api(host, "x2i_audio2image.json", family="qwen25vl")
    _expect_node_error(host, api, "X2IMLLMEncode", "audio", "does not take audio", "Qwen2.5-Omni")
    # an empty chat turn; a chat ending with an assistant turn and nothing added
    api = tiny_api(host, "x2i_multi_turn.json")
    turn = next(k for k, v in api.items() if v["class_type"] == "X2IChatTurn" and v["inputs"]["role"] == "user")
    api[turn]["inputs"]["text"] = " "
    del api[turn]["inputs"]["image"]
    _expect_node_error(host, api, "X2IChatTurn", "turn is empty")
    api = tiny_api(host, "x2i_multi_turn.json", X2IMLLMEncode={"text": ""})
    _expect_node_error(host, api, "X2IMLLMEncode", "ends with an assistant turn")
    # an assistant turn with media
    api = tiny_api(host, "x2i_multi_turn.json")
    turn = next(k for k, v in api.items() if v["class_type"] == "X2IChatTurn" and v["inputs"]["role"] == "assistant")
    api[turn]["inputs"]["image"] = ["20", 0]
    _expect_node_error(host, api, "X2IChatTurn", "assistant turn cannot carry media")
    # a MiniCPM-o folder with .py files but no tokenizer or weights, switch off: read from its files (so none of its
    # Python runs) and refused naming what is missing
    marker = os.path.join(host["base"], "remote-code-ran")
    api = tiny_api(host, "x2i_sampler.json", X2IMLLMLoader={"model_name": "minicpmo-remote"})
    _expect_node_error(host, api, "X2IMLLMLoader", "no tokenizer files")
    assert not os.path.exists(marker)
    # the host keeps working
    entry = host["server"].run(tiny_api(host, "x2i_sampler.json"))
    assert execution_error(entry) is None


def test_core_chat_errors():
    from x2i_core.errors import X2IInputError
    from x2i_core.prompt import SPECS, build_conversation

    with pytest.raises(X2IInputError, match="no turns"):
        build_conversation([], SPECS["comfyui"], processor=None)


def test_reason_node_runs_the_reference_multi_turn_recipe_in_the_executor(host, tmp_path):
    """X2I MLLM Reason, answer_mode 'reference multi-turn', on the shipped multi-turn chat: the node's states
    and answer equal ChatEncoder.reference_multi_turn (which tests/test_reference_oracle.py checks against the
    reference stack); the conversation's last user turn gets the image too."""
    from safetensors.torch import load_file

    from x2i_core.mllm import load_mllm

    api = tiny_api(host, "x2i_multi_turn.json", family="qwen25vl")
    enc = node_of(api, "X2IMLLMEncode")
    ins = api[enc]["inputs"]
    image_id = node_of(api, "LoadImage")
    api[enc] = {"class_type": "X2IMLLMReason", "inputs": {
        "mllm": ins["mllm"], "text": ins["text"], "max_new_tokens": 5, "temperature": 0.0, "seed": 0,
        "answer_mode": "reference multi-turn", "preset": "auto", "image_resolution": 0, "video_resolution": 0,
        "video_fps": 1.0, "max_frames": 768, "frames_fps": 24.0, "chat": ins["chat"], "image": [image_id, 0]}}
    out = str(tmp_path / "hidden.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": host["comfy_dir"], "base": host["base"], "prompt": api,
                                "capture": [enc], "out": out}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "comfy_host.py"), "inprocess", str(spec)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    facts = json.loads(open(out + ".json").read())
    assert facts["success"], facts.get("errors")
    req = _inputs_of(api, host, enc)
    assert len(req.history) == 2 and req.images is not None
    answer, hs = load_mllm(host["tiny"]["mllm"], dtype="fp32").reference_multi_turn(req, max_new_tokens=5)
    assert facts[f"{enc}.answer"] == answer
    got = load_file(out)[f"{enc}.hidden"]
    assert got.shape == hs.hidden.shape and hs.preset == "multiturn"
    assert (got - hs.hidden).abs().max().item() <= TOL
