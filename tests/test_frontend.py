"""Every shipped workflow opens cleanly in the real ComfyUI frontend (headless Chromium)."""

import copy
import json
import os

import pytest

from tools import frontend_check
from tools.comfy_fetch import ROOT

pytestmark = pytest.mark.frontend  # the browser tests also use the host (conftest adds `comfy` to those)

WORKFLOW_DIR = os.path.join(ROOT, "workflows")
WORKFLOWS = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json"))
SHOTS = os.path.join(ROOT, "out", "screenshots")

needs_browser = pytest.mark.skipif(
    not frontend_check.available() and not os.environ.get("CI"),
    reason="chromium, chromium-driver and selenium are not installed (CI installs them)",
)


def _load(name):
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def opened(host):
    os.makedirs(SHOTS, exist_ok=True)
    wfs = {name: _load(name) for name in WORKFLOWS}
    # Negative controls: the same check must notice a missing node and a broken link.
    broken = copy.deepcopy(wfs[WORKFLOWS[0]])
    broken["nodes"][0]["type"] = "X2INoSuchNode"
    wfs["control_missing_node.json"] = broken
    badlink = copy.deepcopy(wfs[WORKFLOWS[0]])
    badlink["links"][0][4] += 3
    wfs["control_bad_link.json"] = badlink
    crowded = copy.deepcopy(wfs[WORKFLOWS[0]])  # the second node over the first, the view zoomed out too far
    crowded["nodes"][1]["pos"] = [p + 20 for p in crowded["nodes"][0]["pos"]]
    crowded["extra"]["ds"] = {"scale": 0.5, "offset": [0, 0]}
    wfs["control_crowded.json"] = crowded
    return frontend_check.open_workflows(host["server"].url, wfs, SHOTS)


def test_thumbnails_exist_for_every_workflow():
    for name in WORKFLOWS:
        assert os.path.isfile(os.path.join(WORKFLOW_DIR, name.replace(".json", ".png"))), name


@needs_browser
def test_the_node_search_finds_the_encode_node_by_its_aliases(host):
    """Typing what users look for (a model name, a task) into the frontend's node search finds X2I MLLM Encode,
    through the node's search_aliases (hosts whose schema has them)."""
    from helpers.comfy import skip_without_search_aliases

    skip_without_search_aliases()
    os.makedirs(SHOTS, exist_ok=True)
    found = frontend_check.search_nodes(host["server"].url, ["qwen", "image prompt", "audio", "zqxjv"], SHOTS)
    for query in ("qwen", "image prompt", "audio"):
        assert "X2I MLLM Encode" in found[query], (query, found[query][:500])
    assert "X2I MLLM Encode" not in found["zqxjv"]  # the control: a word no alias has


@needs_browser
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_without_missing_nodes_or_link_repairs(opened, name):
    r = opened[name]
    print(f"screenshot: {r['screenshot']}")
    assert r["loaded"] is True, r
    assert r["problems"] == [], r["state"]["dialogs"]
    nodes = r["state"]["nodes"]
    assert nodes and all(n["registered"] for n in nodes), nodes
    assert len(nodes) == len(_load(name)["nodes"])
    assert r["state"]["links"] == len(_load(name)["links"])
    assert r["state"]["edges"] == frontend_check.file_edges(_load(name))  # no link dropped or rewired on load
    assert os.path.getsize(r["screenshot"]) > 10_000
    # laid out as saved: every node (title bar and pack badge included) inside the view, none over another
    assert frontend_check.layout_problems(r["state"]) == [], r["screenshot"]
    # the release files the loaders name (none is in the test base) are offered for download by the frontend
    wanted = {m["name"] for n in _load(name)["nodes"] for m in n.get("properties", {}).get("models", [])}
    assert wanted and all(w in r["missing_models"] for w in wanted), (wanted, r["missing_models"][:1000])


def test_workflow_pngs_carry_their_graph_as_comfyui_writes_it():
    from PIL import Image

    for name in WORKFLOWS:
        text = Image.open(os.path.join(WORKFLOW_DIR, name.replace(".json", ".png"))).text
        assert json.loads(text["workflow"]) == _load(name), name
        with open(os.path.join(WORKFLOW_DIR, "api", name), encoding="utf-8") as fh:
            assert json.loads(text["prompt"]) == json.load(fh), name


@pytest.fixture(scope="module")
def opened_png(host):
    """The same graphs from the PNGs that carry them (dragged in as pictures); a fixture of its own, so that a
    run that deselects the PNG test (the current stack's subset in `make test`) does not open them.  The frontend's
    PNG reading is one code path for every file, and every PNG's embedded graph is compared with its JSON without
    a browser (test_workflow_pngs_carry_their_graph_as_comfyui_writes_it), so the browser opens PNG_SAMPLES: the
    simplest graph, the tallest, and the one with a stock CLIP loader."""
    os.makedirs(SHOTS, exist_ok=True)
    pngs = {}
    for name in PNG_SAMPLES:
        with open(os.path.join(WORKFLOW_DIR, name.replace(".json", ".png")), "rb") as fh:
            pngs[name.replace(".json", ".png")] = fh.read()
    return frontend_check.open_workflows(host["server"].url, pngs, SHOTS)


PNG_SAMPLES = ["x2i_text2image.json", "x2i_multi_turn.json", "x2i_text2image_native_qwen.json"]


@needs_browser
@pytest.mark.parametrize("name", PNG_SAMPLES)
def test_workflow_loads_from_its_png(opened_png, name):
    r = opened_png[name.replace(".json", ".png")]
    assert r["loaded"] is True, r
    assert r["problems"] == [], r["state"]["dialogs"]
    nodes = r["state"]["nodes"]
    assert len(nodes) == len(_load(name)["nodes"]) and all(n["registered"] for n in nodes), nodes
    assert sorted(n["type"] for n in nodes) == sorted(n["type"] for n in _load(name)["nodes"])
    assert r["state"]["links"] == len(_load(name)["links"])
    assert r["state"]["edges"] == frontend_check.file_edges(_load(name))


@needs_browser
def test_the_check_itself_notices_missing_nodes_and_bad_links(opened):
    """1.32.x says so in dialogs ("missing nodes", "Workflow Validation"); 1.5x lists missing node packs in its
    Issues panel and repairs a bad link silently, which the graph-against-file comparison notices."""
    missing = opened["control_missing_node.json"]
    assert {"missing nodes", "Missing Node Packs"} & set(missing["problems"]), missing
    assert not all(n["registered"] for n in missing["state"]["nodes"])
    bad = opened["control_bad_link.json"]
    wf = _load(WORKFLOWS[0])
    wf["links"][0][4] += 3
    assert bad["state"]["edges"] != frontend_check.file_edges(wf), bad["state"]["edges"]
    if bad["issues"] is None:  # the 1.32.x frontend also says it
        assert "Workflow Validation" in bad["problems"], bad
    crowded = frontend_check.layout_problems(opened["control_crowded.json"]["state"])
    assert any("overlap" in p for p in crowded) and any("below 0.6" in p for p in crowded), crowded


def test_workflow_templates_are_served(host):
    listing = host["server"].get("/workflow_templates")
    assert any(sorted(v) == sorted(n[:-5] for n in WORKFLOWS) for v in listing.values()), listing


RUNNABLE = [w for w in WORKFLOWS if w != "x2i_text2image_native_qwen.json"]  # stock Load CLIP needs a real 7B file


@pytest.fixture(scope="module")
def ran(host):
    """Every runnable shipped workflow, run by pressing Run in the frontend (widgets set by name to the tiny
    models, small sizes and steps); first one run cancelled from the UI."""
    from helpers.comfy import tiny_api

    runs = {}
    for name in RUNNABLE:
        api = tiny_api(host, name)
        runs[name] = (_load(name), {nid: {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
                                    for nid, node in api.items()})
    long = {nid: dict(values) for nid, values in runs["x2i_sampler.json"][1].items()}
    for values in long.values():
        if "steps" in values:
            values["steps"] = 200  # the X2I Sampler's maximum: minutes on this machine
    os.makedirs(SHOTS, exist_ok=True)
    return frontend_check.run_workflows(host["server"].url, runs, SHOTS, host["server"].get,
                                        cancel=("x2i_sampler.json", long))


@needs_browser
@pytest.mark.parametrize("name", RUNNABLE)
def test_workflow_runs_from_the_run_button(ran, host, name):
    from PIL import Image

    r = ran[name]
    print(f"screenshot: {r['screenshot']}")
    assert r["loaded"] is True and r["missing"] == [], r
    assert r["status"].get("status_str") == "success", r["status"]
    assert r["shown"]["drawn"] >= 1, r["shown"]  # the image is on its node in the UI
    files = host["server"].output_images({"outputs": r["outputs"]})
    assert files and all(Image.open(f).size == (64, 48) for f in files), files
    assert not [d for d in r["dialogs"] if "error" in d.lower()], r["dialogs"]


@needs_browser
def test_a_run_cancelled_from_the_ui_stops_and_the_next_run_works(ran):
    r = ran["cancel:x2i_sampler.json"]
    events = [m[0] for m in r["status"].get("messages", [])]
    assert "execution_interrupted" in events and "execution_success" not in events, r["status"]
    assert ran["x2i_sampler.json"]["status"].get("status_str") == "success"  # the run after the cancel
