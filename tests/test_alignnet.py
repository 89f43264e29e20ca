"""AlignNet: the three file layouts, the three fusion variants, a hand-written forward, and bad files."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from x2i_core.alignnet import AlignNet, AlignNetConfig, convert_alignnet, load_alignnet
from x2i_core.errors import X2IFileError, X2IShapeError, X2IUnsafeFileError
from x2i_core.tiny import build_alignnet, save_published_alignnet


def small_net(fusion="conv", use_t5=False, seed=0, channels=3, hidden=16):
    return build_alignnet(channels=channels, hidden=hidden, seed=seed, fusion=fusion, use_t5=use_t5,
                          output_dim0=12, output_dim1=24)


def x_for(net, seq=7, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, net.config.in_channels, seq, net.config.input_dim, generator=g)


@pytest.mark.parametrize("fusion,use_t5", [("conv", False), ("scale", False), ("conv", True), ("scale", True), ("mean", False)])
def test_three_layouts_load_to_identical_outputs(tmp_path, fusion, use_t5):
    net = small_net(fusion, use_t5)
    x = x_for(net)
    ref = net(x)
    ours = tmp_path / "ours.safetensors"
    published = tmp_path / "published.pt"
    bare = tmp_path / "diffusion_pytorch_model.bin"
    net.save(ours)
    save_published_alignnet(net, str(published))
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, bare)  # DDP-style bare dict
    loaded = [load_alignnet(ours), load_alignnet(published), load_alignnet(bare, net.config.to_dict())]
    for other in loaded:
        assert other.config == net.config
        loaded_sd, want_sd = other.state_dict(), net.state_dict()
        assert loaded_sd.keys() == want_sd.keys() and all(torch.equal(loaded_sd[k], want_sd[k]) for k in want_sd)
        p, s = other(x)
        # The weights are bit-identical; the products may round differently in the last bit (torch 2.14 picks
        # its CPU kernels by buffer alignment, and safetensors' buffers are aligned differently).
        torch.testing.assert_close(p, ref[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(s, ref[1], rtol=0, atol=1e-6)


def test_published_state_dict_names_and_config_keys(tmp_path):
    net = small_net("conv")
    assert sorted(net.state_dict()) == sorted([
        "conv.weight", "conv.bias", "mlp.layernorm.weight", "mlp.layernorm.bias", "mlp.projector.0.weight",
        "mlp.projector.2.weight", "mlp.fc.1.weight", "mlp.fc.1.bias"])
    assert set(net.config.to_dict()) == {"in_channels", "kernel_size", "input_dim", "output_dim0", "output_dim1",
                                         "num_layers", "num_heads", "norm_eps", "head_dim", "use_t5", "use_scale",
                                         "use_cnn"}
    assert "cha_scale" in small_net("scale").state_dict()
    assert any(k.startswith("t5stack.block.1.") for k in small_net("conv", True).state_dict())


def test_forward_matches_hand_written_computation():
    net = small_net("conv", seed=3)
    sd = net.state_dict()
    x = x_for(net, seq=9)
    # conv over the (S, H) plane mixing C -> 1, kernel 5, padding 2
    fused = F.conv2d(x, sd["conv.weight"], sd["conv.bias"], padding=2)[:, 0]
    mu = fused.mean(-1, keepdim=True)
    var = fused.var(-1, unbiased=False, keepdim=True)
    normed = (fused - mu) / torch.sqrt(var + 1e-6) * sd["mlp.layernorm.weight"] + sd["mlp.layernorm.bias"]
    h1 = normed @ sd["mlp.projector.0.weight"].T

    def gelu(t):
        return 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))

    seq = gelu(h1) @ sd["mlp.projector.2.weight"].T
    pooled = (gelu(seq) @ sd["mlp.fc.1.weight"].T + sd["mlp.fc.1.bias"]).mean(dim=1)
    p, s = net(x)
    assert s.shape == (2, 9, 24) and p.shape == (2, 12)
    assert torch.allclose(s, seq, atol=1e-5) and torch.allclose(p, pooled, atol=1e-5)


def test_scale_fusion_is_weighted_mean_over_layers():
    net = small_net("scale", seed=4)
    x = x_for(net)
    fused = (net.cha_scale * x).mean(dim=1)
    assert torch.allclose(net.fuse(x), fused)
    assert torch.allclose(net(x)[1], net.mlp(fused)[1])


def test_config_inferred_from_bare_state_dict_shapes(tmp_path):
    for fusion, use_t5 in (("conv", False), ("scale", True)):
        net = small_net(fusion, use_t5)
        path = tmp_path / f"bare-{fusion}.safetensors"
        save_file(net.state_dict(), str(path))
        loaded = load_alignnet(path)
        for key in ("in_channels", "input_dim", "output_dim0", "output_dim1", "use_t5", "use_scale"):
            assert getattr(loaded.config, key) == getattr(net.config, key)
        x = x_for(net)
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
        torch.testing.assert_close(loaded(x)[1], net(x)[1], rtol=0, atol=1e-6)  # round-off: see above


def test_convert_published_file_to_safetensors(tmp_path):
    net = small_net("conv")
    save_published_alignnet(net, str(tmp_path / "p.pt"))
    convert_alignnet(tmp_path / "p.pt", tmp_path / "o.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["x2i_format"] == "alignnet" and json.loads(meta["config"]) == net.config.to_dict()


# -- bad files --------------------------------------------------------------

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_pickle_that_would_execute_code_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"config": {}, "state_dict": {"conv.weight": _Evil(str(marker))}}
    if writer == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    else:
        torch.save(payload, path)
    with pytest.raises(X2IUnsafeFileError, match="refused"):
        load_alignnet(path)
    assert not marker.exists()


def test_missing_empty_truncated_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(X2IFileError, match="does not exist"):
        load_alignnet(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(X2IFileError, match="empty"):
        load_alignnet(empty)
    net = small_net()
    good = tmp_path / "good.safetensors"
    net.save(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(X2IFileError, match="corrupt or truncated"):
        load_alignnet(cut)
    html = tmp_path / "page.safetensors"
    html.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(X2IFileError, match="neither safetensors nor a torch"):
        load_alignnet(html)
    foreign = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(X2IFileError, match="is not an AlignNet"):
        load_alignnet(foreign)
    truncated_pt = tmp_path / "cut.pt"
    save_published_alignnet(net, str(tmp_path / "full.pt"))
    truncated_pt.write_bytes((tmp_path / "full.pt").read_bytes()[:2000])
    with pytest.raises(X2IFileError):
        load_alignnet(truncated_pt)


def test_wrong_config_for_bare_state_dict_names_the_tensor(tmp_path):
    net = small_net()
    path = tmp_path / "bare.bin"
    torch.save(net.state_dict(), path)
    cfg = dict(net.config.to_dict(), input_dim=32)
    with pytest.raises(X2IFileError, match="mlp.layernorm.weight"):
        load_alignnet(path, cfg)


def test_dimension_mismatch_names_the_mllm_it_fits():
    net = AlignNet(AlignNetConfig.preset("qwen2.5-vl-3b"))
    wrong = torch.zeros(1, 29, 4, 3584)
    with pytest.raises(X2IShapeError) as info:
        net.check_hidden(wrong, "Qwen2.5-VL (Qwen2.5-VL-7B-Instruct)", "AlignNet 'qwen3b.safetensors'")
    msg = str(info.value)
    assert "Qwen2.5-VL-3B-Instruct" in msg and "C=37" in msg and "H=2048" in msg
    assert "Qwen2.5-VL-7B-Instruct" in msg and "C=29" in msg and "H=3584" in msg
    assert "qwen3b.safetensors" in msg
