"""The pack as the Comfy Registry and the ComfyUI frontend meet it: `comfy node validate` clean, the published zip
(built by comfy-cli's own `comfy node pack`) holding what a user runs and importing in the real host, help pages
served and current, workflows that name their pack and their models' download addresses, loaders that list only
their own kind."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers.comfy import ROOT, _expect_node_error, load_workflow, skip_without_search_aliases, tiny_api

pytestmark = pytest.mark.publish

PACK_ZIP_TOP = {"__init__.py", "nodes", "x2i_core", "web", "workflows", "docs", "requirements.txt", "pyproject.toml",
                "README.md", "LICENSE"}


def _comfy_cli():
    for path in (os.path.join(ROOT, ".comfy-cli", "bin", "comfy"), shutil.which("comfy")):
        if path and os.path.exists(path):
            return path
    if os.environ.get("CI"):
        pytest.fail("comfy-cli is missing (make comfy-cli installs it)")
    pytest.skip("comfy-cli is not installed (make comfy-cli)")


def _comfy(args, cwd):
    env = dict(os.environ, DO_NOT_TRACK="1")
    return subprocess.run([_comfy_cli(), "--skip-prompt", "--no-enable-telemetry", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _tracked_copy(dst):
    """The working tree's git-tracked files (as they are now) in a fresh git repository: what a publish from a
    clean checkout of this tree sees."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)) or dst, exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))
    for args in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", "-C", str(dst), *args], check=True, capture_output=True)
    return dst


def test_comfy_node_validate_is_clean():
    r = _comfy(["node", "validate"], ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "All validation checks passed" in out, out[-3000:]
    assert "Warning" not in out and "S102" not in out and "exec" not in out.lower().replace("execut", ""), out[-3000:]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """node.zip as `comfy node pack` builds it (git-tracked files minus .comfyignore, plus includes)."""
    tree = _tracked_copy(tmp_path_factory.mktemp("publish") / "pack")
    r = _comfy(["node", "pack"], tree)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return tree / "node.zip"


def test_the_published_zip_holds_what_a_comfyui_user_runs(published):
    with zipfile.ZipFile(published) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == PACK_ZIP_TOP, (sorted(top - PACK_ZIP_TOP), sorted(PACK_ZIP_TOP - top))
    assert "web/icon.svg" in names and any(n.startswith("web/docs/X2I") for n in names)
    assert not [n for n in names if n.endswith((".pyc", ".safetensors", ".pt", ".bin"))], names
    print(f"\nnode.zip: {len(names)} files, {os.path.getsize(published) / 1e6:.2f} MB")


@pytest.mark.comfy
def test_the_pack_imports_from_the_published_zip_in_the_real_host(published, tmp_path):
    """Extract the zip into a fresh host base's custom_nodes (as the Registry installs it) and boot the real
    ComfyUI with it: every X2I node registers, and no import fails."""
    from helpers.comfy import comfy_host_dir

    base = tmp_path / "base"
    dest = base / "custom_nodes" / "x2i-any-prompt"
    dest.mkdir(parents=True)
    with zipfile.ZipFile(published) as zf:
        zf.extractall(dest)
    for sub in ("input", "output", "temp", "user", "models"):
        (base / sub).mkdir(exist_ok=True)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"comfy_dir": comfy_host_dir(), "base": str(base)}))
    code = ("import json, sys\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "from tools.comfy_inprocess import boot_in_process\n"
            f"boot_in_process({str(spec)!r})\n"
            "import nodes\n"
            "ours = {k: getattr(v, 'RELATIVE_PYTHON_MODULE', '') for k, v in nodes.NODE_CLASS_MAPPINGS.items()"
            " if k.startswith('X2I')}\n"
            "print('RESULT', json.dumps({'nodes': ours, 'web': {k: v for k, v in nodes.EXTENSION_WEB_DIRS.items()}}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ours_failed = [ln for ln in r.stderr.splitlines() if "IMPORT FAILED" in ln and "x2i" in ln]
    assert not ours_failed, ours_failed
    facts = json.loads(r.stdout.split("RESULT", 1)[1])
    expected = {"X2IMLLMLoader", "X2IMLLMEncode", "X2IAlignNetLoader", "X2IAlignNetProject", "X2ISampler",
                "X2ILightControlLoader", "X2IChatTurn", "X2IMLLMReason", "X2ICLIPEncode", "X2IBlendConditioning"}
    assert set(facts["nodes"]) == expected, facts
    assert all("x2i-any-prompt" in m for m in facts["nodes"].values()), facts
    assert os.path.samefile(facts["web"]["x2i-any-prompt"], dest / "web"), facts["web"]


# -- help pages and search aliases ----------------------------------------------------------------------------

@pytest.mark.comfy
def test_every_node_has_a_current_help_page_served_by_the_host(host):
    """The page of each node, as the frontend's help panel fetches it, equals what tools/make_node_docs.py writes
    from the live schema (so a page never describes an input that changed)."""
    import urllib.request

    from tools.comfy_fetch import PACK_LINK_NAME
    from tools.make_node_docs import pages

    info = host["server"].object_info()
    expected = pages(info)
    assert set(expected) == {k for k in info if k.startswith("X2I")}
    for node_id, text in expected.items():
        with open(os.path.join(ROOT, "web", "docs", f"{node_id}.md"), encoding="utf-8") as fh:
            assert fh.read() == text, f"web/docs/{node_id}.md is stale: python tools/make_node_docs.py OBJECT_INFO"
        url = f"{host['server'].url}/extensions/{PACK_LINK_NAME}/docs/{node_id}.md"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and resp.read().decode("utf-8") == text, url
        assert "## Inputs" in text and "**Fits:**" in text and "**Recipe:**" in text


@pytest.mark.comfy
def test_search_aliases_reach_the_schema_where_the_host_has_them(host):
    skip_without_search_aliases()
    info = host["server"].object_info()["X2IMLLMEncode"]
    aliases = info.get("search_aliases") or []
    for word in ("qwen", "image prompt", "audio", "multimodal"):
        assert word in aliases, aliases


# -- workflows that know their pack and their models -------------------------------------------------------------

LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "VAELoader": "vae", "CLIPLoader": "text_encoders",
                  "X2IAlignNetLoader": "x2i", "X2ILightControlLoader": "x2i"}


@pytest.mark.comfy
def test_workflow_nodes_carry_their_pack_and_their_models_download_addresses(host):
    import tomllib

    from tools.make_workflows import MODEL_SOURCES, WORKFLOWS

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    from tools.comfy_fetch import PACK_LINK_NAME

    info = host["server"].object_info()
    # the test host holds the pack where the Registry installs it: custom_nodes/<its id> (the badge users see)
    assert PACK_LINK_NAME == project["name"]
    assert str(info["X2IMLLMEncode"]["python_module"]) == f"custom_nodes.{project['name']}"
    checked_models = 0
    for name in WORKFLOWS:
        for node in load_workflow(name)["nodes"]:
            if node["type"] == "Note":
                continue
            props, schema = node["properties"], info[node["type"]]
            ours = str(schema.get("python_module", "")).startswith("custom_nodes.")
            assert ours == node["type"].startswith("X2I"), (name, node["type"], schema.get("python_module"))
            if ours:
                assert (props.get("cnr_id"), props.get("ver")) == (project["name"], project["version"]), (name, props)
            else:
                assert "cnr_id" not in props, (name, node["type"], props)
            values = [v for v in node.get("widgets_values", []) if isinstance(v, str)]
            want = [v for v in values if v in MODEL_SOURCES] if node["type"] in LOADER_FOLDERS else []
            models = props.get("models", [])
            assert [m["name"] for m in models] == want, (name, node["type"], models)
            for m in models:
                assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"]), m
                assert m["directory"] == LOADER_FOLDERS[node["type"]], (name, m)
                checked_models += 1
    assert checked_models >= 2 * len(WORKFLOWS)  # every workflow names at least FLUX and its VAE


# -- loaders that list only their own kind ------------------------------------------------------------------------

@pytest.mark.comfy
def test_the_alignnet_and_lightcontrol_loaders_list_only_their_own_kind(host, tmp_path):
    from safetensors.torch import save_file

    x2i = os.path.join(host["base"], "models", "x2i")
    # a mixed folder: the tiny AlignNets and LightControls (safetensors and published torch files), plus a
    # renamed LightControl that claims to be an AlignNet by its name, and a file of no recorded kind
    shutil.copyfile(host["tiny"]["lightcontrol"], os.path.join(x2i, "alignnet-looking-lightcontrol.bin"))
    import torch

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, os.path.join(x2i, "some-lora.safetensors"))
    info = host["server"].object_info()

    def options(node, name):
        spec = info[node]["input"]["required"][name]
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    aligns, lights = options("X2IAlignNetLoader", "alignnet_name"), options("X2ILightControlLoader", "lightcontrol_name")
    from x2i_core.io import weights_file_kind

    # the lists hold names relative to the folder, subfolders included (as ComfyUI lists them)
    kinds = {n: weights_file_kind(os.path.join(x2i, n)) for n in set(aligns) | set(lights)}
    assert {kinds[n] for n in aligns} <= {"alignnet", None} and {kinds[n] for n in lights} <= {"lightcontrol", None}
    assert "alignnet-looking-lightcontrol.bin" in lights and "alignnet-looking-lightcontrol.bin" not in aligns
    assert "some-lora.safetensors" in aligns and "some-lora.safetensors" in lights  # no recorded kind: both
    assert any(kinds[n] == "alignnet" for n in aligns) and any(kinds[n] == "lightcontrol" for n in lights)
    # chosen anyway through an API prompt: refused by the host's list check (0.28) or by the loader, by name
    api = tiny_api(host, "x2i_sampler.json", X2IAlignNetLoader={"alignnet_name": "alignnet-looking-lightcontrol.bin"})
    _expect_node_error(host, api, "X2IAlignNetLoader", "is a LightControl file", "X2I LightControl Loader")


def test_a_kept_base_holds_one_copy_of_the_pack(tmp_path):
    """The demo, thumbnail and object-info bases live in the cache between runs: the pack linked there under an
    earlier name, or from another checkout, is removed, so the host never registers the nodes twice; other packs
    stay."""
    from tools.comfy_fetch import PACK_LINK_NAME, prepare_base

    nodes_dir = tmp_path / "base" / "custom_nodes"
    nodes_dir.mkdir(parents=True)
    old_checkout, other_pack = tmp_path / "old-checkout", tmp_path / "some-pack"
    (old_checkout / "x2i_core").mkdir(parents=True)
    (old_checkout / "x2i_core" / "__init__.py").write_text("")
    other_pack.mkdir()
    os.symlink(old_checkout, nodes_dir / "comfyui-x2i")
    os.symlink(other_pack, nodes_dir / "some-pack")
    tiny = {k: str(tmp_path / k) for k in ("mllm", "alignnet_safetensors", "alignnet", "comfy_flux", "comfy_vae",
                                           "comfy_lightcontrol")}
    prepare_base(str(tmp_path / "base"), tiny)
    assert sorted(os.listdir(nodes_dir)) == sorted([PACK_LINK_NAME, "some-pack"])
    assert os.path.samefile(nodes_dir / PACK_LINK_NAME, ROOT)
