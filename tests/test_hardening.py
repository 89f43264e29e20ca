"""Hardening, round two (issue: budgets, declared sizes, prompts never lost, caches an interrupt cannot poison)."""

import os

import pytest
import torch

from x2i_core.mllm import EncodeRequest


class _Interrupted(Exception):
    """Stands in for ComfyUI's InterruptProcessingException (raised from a progress hook on Cancel)."""


def test_a_cancel_inside_the_opening_forward_leaves_no_poisoned_cache(tiny):
    """The opening cache is written only once complete: a Cancel during its forward, then the same encode,
    gives the bytes a fresh model gives, and the cache holds the opening (not a stored "none")."""
    from x2i_core.mllm import load_mllm

    fresh = load_mllm(tiny["mllm"], dtype="fp32").encode_text("a lighthouse at dusk", preset="training").hidden
    enc = load_mllm(tiny["mllm"], dtype="fp32")
    calls = {"n": 0}

    def cancel_once(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise _Interrupted()

    hook = enc.decoder_layers[0].register_forward_pre_hook(cancel_once)
    try:
        with pytest.raises(_Interrupted):
            enc.encode_text("a lighthouse at dusk", preset="training")
    finally:
        hook.remove()
    assert all(v is not None for v in enc.__dict__.get("_prefixes", {}).values()), "a half-written cache entry"
    again = enc.encode_text("a lighthouse at dusk", preset="training").hidden
    assert enc.prompt_prefix("training") is not None
    assert torch.equal(again, fresh)


def _alignnet_file(path, **config_changes):
    """A tiny AlignNet whose stored config claims ``config_changes`` (its tensors unchanged)."""
    import json

    from safetensors.torch import load_file, safe_open, save_file

    from x2i_core.tiny import build_alignnet

    build_alignnet(channels=3, hidden=64, seed=1, use_t5=True, output_dim0=32, output_dim1=48).save(path)
    with safe_open(path, "pt") as fh:
        meta = dict(fh.metadata())
    cfg = json.loads(meta["config"])
    cfg.update(config_changes)
    meta["config"] = json.dumps(cfg)
    save_file(load_file(path), path, metadata=meta)
    return path


@pytest.mark.parametrize("changes,needle", [
    ({"output_dim1": 10**6}, "has shape"),   # once: "tried to allocate 4 TB"
    ({"output_dim1": 20_000}, "has shape"),  # once: +1.5 GB before the error
    ({"num_heads": 0}, "'num_heads' must be positive"),   # once: ZeroDivisionError
    ({"num_heads": -2}, "'num_heads' must be positive"),  # once: "negative dimension"
    ({"norm_eps": float("nan")}, "'norm_eps' must be a small positive number"),
])
def test_an_alignnet_config_that_contradicts_its_tensors_is_refused_before_allocation(tmp_path, changes, needle):
    import subprocess
    import sys

    path = _alignnet_file(str(tmp_path / "a.safetensors"), **changes)
    code = ("import resource, sys\n"
            "from x2i_core.alignnet import load_alignnet\n"
            "from x2i_core.errors import X2IFileError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n"
            f"    load_alignnet({path!r})\n"
            "    print('LOADED')\n"
            "except X2IFileError as exc:\n"
            "    print('ERROR', exc)\n"
            "print('RISE_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "ERROR" in out and needle in out and "Traceback" not in r.stderr, out + r.stderr[-2000:]
    rise_mb = int(out.split("RISE_KB")[1].split()[0]) / 1024
    assert rise_mb <= 100, f"{rise_mb:.0f} MB allocated before the refusal"


LONG = " ".join(["A detailed description of a medieval castle on a green hill under a stormy sky."] * 20)


def test_a_long_text_chat_keeps_its_last_turn_and_drops_the_oldest(encoder, caplog):
    """Once: 'training' kept the first 512 tokens, so after two long turns two different final prompts gave
    byte-identical conditioning."""
    from x2i_core.mllm import ChatTurn

    history = [ChatTurn("user", LONG), ChatTurn("assistant", LONG), ChatTurn("user", LONG), ChatTurn("assistant", "ok")]
    a = encoder.encode(EncodeRequest(text="a red fox in the snow", history=history), preset="auto")
    b = encoder.encode(EncodeRequest(text="a blue whale in the deep sea", history=history), preset="auto")
    assert a.preset == "training" and a.hidden.shape[2] == 512
    assert not torch.equal(a.hidden, b.hidden)
    assert "dropped its" in caplog.text
    # what is kept is the newest turns, whole: the prompt equals the chat without its first exchange
    c = encoder.encode(EncodeRequest(text="a red fox in the snow", history=history[2:]), preset="auto")
    assert torch.equal(a.hidden, c.hidden)


def test_a_chat_whose_last_turn_alone_is_too_long_is_refused_with_the_numbers(encoder):
    from x2i_core.errors import X2IInputError
    from x2i_core.mllm import ChatTurn

    with pytest.raises(X2IInputError, match=r"last turn alone is more than the 'training' preset's fixed 512"):
        encoder.encode(EncodeRequest(text=LONG + " " + LONG, history=[ChatTurn("user", "hi"), ChatTurn("assistant", "hello")]),
                       preset="training")


def test_a_single_long_prompt_is_still_cut_as_the_reference_training_did(encoder):
    hs = encoder.encode(EncodeRequest(text=LONG + " " + LONG), preset="training")
    assert hs.hidden.shape[2] == 512 and hs.lengths[0] > 512


def test_reasoning_over_a_question_longer_than_512_tokens_keeps_its_generation_prompt(encoder):
    """Once: the question was cut at 512 (losing the generation prompt) and the answer sliced at the uncut
    length: "produced no answer tokens" although the model answered."""
    text, hs = encoder.generate_answer(EncodeRequest(text=LONG + " What is in the picture?"), max_new_tokens=6)
    assert hs.lengths[0] >= 1 and hs.hidden.shape[2] == hs.lengths[0]
    batch, _, lengths = encoder.prepare([EncodeRequest(text=LONG + " What is in the picture?")], "scripts", pad=False)
    assert lengths[0] > 512 and batch["input_ids"].shape[1] == lengths[0]
    assert encoder.processor.tokenizer.decode(batch["input_ids"][0, -3:]).strip().startswith("assistant") or \
        "assistant" in encoder.processor.tokenizer.decode(batch["input_ids"][0, -5:])
