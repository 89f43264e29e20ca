"""Open workflows in the real ComfyUI frontend (served by the host) in headless Chromium.

Uses Debian's ``chromium`` + ``chromium-driver`` through selenium.  For each
workflow: load the page, wait for ``window.app.graph``, call
``app.loadGraphData(workflow)``, collect what the frontend says (dialogs,
toasts, console) and save a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
import urllib.request

LOW_QUALITY_ZOOM = 0.6  # below this zoom the frontend draws nodes as bare boxes (LiteGraph's low-quality mode)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

PROBLEM_MARKERS = ("missing nodes", "Workflow Validation", "validation", "Some nodes", "not found",
                   "Missing Node Types", "Missing Node Packs", "Invalid workflow", "error loading")


def available() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def _start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="x2i-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1300", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts), profile


# the frontend's passing notices over the graph: 1.32's toasts, 1.5x's "N issues found" card
_NOTICES = "for (const t of document.querySelectorAll('.p-toast, [data-testid=\"error-overlay\"]')) "
RESET_SETTINGS = {"Comfy.RightSidePanel.IsOpen": False}  # 1.5x's right side panel (closed by default)


def _fresh_page(driver, url: str, timeout: float) -> list[str]:
    """Load the frontend from a clean slate (it restores the last workflow from storage) and close what a
    first visit opens (the Templates browser, announcement banners), so screenshots show the graph."""
    # the frontend keeps its panels' state in the server's user settings: a side panel that an earlier check
    # opened (the Issues panel) would cover the graph of every later page
    for key, value in RESET_SETTINGS.items():
        req = urllib.request.Request(f"{url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
    if not (driver.current_url or "").startswith(url):  # storage can be cleared only from the page's origin
        driver.get(url + "/")
    driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    driver.get(url + "/")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
            break
        time.sleep(0.5)
    else:
        raise TimeoutError("the ComfyUI frontend did not start")
    time.sleep(1.0)
    # a fresh ComfyUI opens its Templates browser on the first visit only (the frontend then stores that)
    first = not getattr(driver, "_x2i_visited", False)
    driver._x2i_visited = True
    return dismiss_first_run(driver, wait=8.0 if first else 0.5)


_VISIBLE_DIALOGS = ("return Array.from(document.querySelectorAll('.p-dialog, [role=dialog]')).filter(e => {"
                    "const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; })"
                    ".map(e => (e.innerText || '').split('\\n')[0])")


def dismiss_first_run(driver, wait: float = 0.5) -> list[str]:
    """Close what a first visit opens: dialogs (the Templates browser on a fresh ComfyUI) with Escape or
    their top-right button, and the announcement banner. Waits up to ``wait`` s for a dialog to show up.
    Returns the titles of the dialogs closed."""
    from selenium.webdriver.common.keys import Keys

    closed = []
    deadline = time.time() + wait
    while time.time() < deadline or driver.execute_script(_VISIBLE_DIALOGS):
        titles = driver.execute_script(_VISIBLE_DIALOGS)
        if not titles:
            if closed:
                break
            time.sleep(0.3)
            continue
        if len(closed) > 8:
            raise RuntimeError(f"dialogs do not close: {titles}")
        closed.extend(titles)
        driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)
        time.sleep(0.5)
        driver.execute_script(  # still open: its button nearest the top-right corner
            "for (const d of document.querySelectorAll('.p-dialog, [role=dialog]')) {"
            " const r = d.getBoundingClientRect(); if (!r.width) continue;"
            " let best = null, dist = 1e9;"
            " for (const b of d.querySelectorAll('button')) { const q = b.getBoundingClientRect();"
            "  const k = (r.right - q.right) + (q.top - r.top); if (q.width && k < dist) { dist = k; best = b; } }"
            " if (best) best.click(); }")
        time.sleep(0.5)
    driver.execute_script(  # the top announcement banner: its last button is the close cross
        "const bar = Array.from(document.querySelectorAll('div.pointer-events-auto')).find(d =>"
        " /Introducing/.test(d.innerText || '') && d.getBoundingClientRect().top < 5);"
        "if (bar) { const bs = bar.querySelectorAll(':scope > button'); if (bs.length) bs[bs.length - 1].click(); }")
    # the minimap overlay covers part of the graph in screenshots
    driver.execute_script("const b = document.querySelector('button[aria-label^=\"Hide Minimap\"]'); if (b) b.click();")
    time.sleep(0.3)
    return closed


def _load_graph(driver, name: str, wf) -> object:
    if isinstance(wf, bytes):  # a PNG: handed to the frontend as a dropped file would be
        driver.execute_script(
            "window.__x2i_done = false; const b = atob(arguments[0]); const a = new Uint8Array(b.length);"
            "for (let i = 0; i < b.length; i++) a[i] = b.charCodeAt(i);"
            "const f = new File([a], arguments[1], {type: 'image/png'});"
            "Promise.resolve(window.app.handleFile(f)).then(() => { window.__x2i_done = true; },"
            " e => { window.__x2i_done = 'ERR ' + e; });", base64.b64encode(wf).decode(), name)
    else:
        driver.execute_script("window.__x2i_done = false; window.app.loadGraphData(arguments[0]).then("
                              "() => { window.__x2i_done = true; }, e => { window.__x2i_done = 'ERR ' + e; });",
                              wf)
    deadline = time.time() + 30
    while time.time() < deadline and driver.execute_script("return window.__x2i_done") is False:
        time.sleep(0.2)
    time.sleep(2.0)
    return driver.execute_script("return window.__x2i_done")


def _graph_state(driver) -> dict:
    state = driver.execute_script(
        "const g = window.app.graph; const links = g.links instanceof Map ? Array.from(g.links.values())"
        " : Object.values(g.links || {}); return {nodes: g._nodes.map(n => ({type: n.type, "
        "registered: !!LiteGraph.registered_node_types[n.type], inputs: (n.inputs||[]).length, "
        "outputs: (n.outputs||[]).length, has_errors: !!n.has_errors})), "
        "links: Object.keys(g.links || {}).length, "
        "edges: links.filter(l => l).map(l => [l.origin_id, l.origin_slot, l.target_id, l.target_slot]), "
        "dialogs: Array.from(document.querySelectorAll("
        "'.p-dialog, .p-toast-message')).filter(e => e.offsetParent !== null).map(e => e.innerText), "
        # the layout as drawn: each node's box (its title bar included) on screen, and the canvas's size
        "boxes: g._nodes.map(n => { const ds = window.app.canvas.ds; const th = LiteGraph.NODE_TITLE_HEIGHT || 30;"
        " const x = (n.pos[0] + ds.offset[0]) * ds.scale, y = (n.pos[1] - th + ds.offset[1]) * ds.scale;"
        " return {id: n.id, type: n.type, x: x, y: y, w: n.size[0] * ds.scale, h: (n.size[1] + th) * ds.scale}; }), "
        "view: [window.app.canvas.canvas.clientWidth, window.app.canvas.canvas.clientHeight], "
        "canvas_at: (() => { const r = window.app.canvas.canvas.getBoundingClientRect(); return [r.left, r.top]; })(), "
        "scale: window.app.canvas.ds.scale}")
    state["edges"] = sorted([int(v) for v in e] for e in state["edges"])
    return state


def layout_problems(state: dict, margin: float = 2.0) -> list[str]:
    """Nodes drawn outside the view, and pairs of nodes whose boxes (title bars and badges included) overlap,
    from :func:`_graph_state`'s boxes (screen pixels)."""
    boxes, (vw, vh) = state.get("boxes", []), state.get("view", [0, 0])
    out = []
    if state.get("scale", 1.0) < LOW_QUALITY_ZOOM - 1e-6:
        out.append(f"opens at zoom {state['scale']:.2f}, below {LOW_QUALITY_ZOOM}, where the frontend draws nodes "
                   "without text")
    for b in boxes:
        if b["x"] < -margin or b["y"] < -margin or b["x"] + b["w"] > vw + margin or b["y"] + b["h"] > vh + margin:
            out.append(f"{b['type']} #{b['id']} outside the {vw}x{vh} view at {[round(b[k]) for k in 'xywh']}")
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["x"] < b["x"] + b["w"] - margin and b["x"] < a["x"] + a["w"] - margin and \
                    a["y"] < b["y"] + b["h"] - margin and b["y"] < a["y"] + a["h"] - margin:
                out.append(f"{a['type']} #{a['id']} and {b['type']} #{b['id']} overlap")
    return out


def file_edges(workflow: dict) -> list[list[int]]:
    """The links of a UI workflow as the frontend's graph should hold them: [origin, slot, target, slot]."""
    return sorted([int(v) for v in link[1:5]] for link in workflow.get("links", []))


_ISSUE_SECTIONS = ("Missing Node Packs", "Missing Models")


def issues_panel(driver) -> dict | None:
    """Frontends from ~1.40 on report what a loaded workflow lacks in a toast ("3 issues found") whose *View
    details* opens the Issues panel: sections "Missing Node Packs" (node types) and "Missing Models" (file, then
    its folder). Opens it and returns ``{"text", "sections": {title: [lines]}}``; None where there is no such
    toast (1.32.x shows dialogs instead)."""
    clicked = driver.execute_script(
        "const b = Array.from(document.querySelectorAll('button')).find(b => /^\\s*View details\\s*$/.test("
        "b.innerText || '')); if (!b) return false; b.click(); return true;")
    if not clicked:
        return None
    time.sleep(1.5)
    text = driver.execute_script("return document.body.innerText")
    start = text.find("Setup required")
    end = text.find("For more help", max(start, 0))
    panel = text[start if start >= 0 else 0:end if end >= 0 else len(text)]
    sections, current = {}, None
    for line in (x.strip() for x in panel.splitlines()):
        if line in _ISSUE_SECTIONS:
            current = sections.setdefault(line, [])
        elif current is not None and line and not line.isdigit():
            current.append(line)
    return {"text": panel[-3000:], "sections": sections}


def open_workflows(url: str, workflows: dict[str, dict | bytes], shot_dir: str, timeout: float = 90.0) -> dict:
    """Load each workflow (UI JSON, or PNG bytes carrying one) into a fresh page; what the frontend says."""
    driver, profile = _start_browser()
    results = {}
    try:
        for name, wf in workflows.items():
            _fresh_page(driver, url, timeout)
            driver.get_log("browser")  # drop start-up messages
            before = driver.execute_script("return document.body.innerText")
            done = _load_graph(driver, name, wf)
            text = driver.execute_script("return document.body.innerText")
            state = _graph_state(driver)
            logs = [e["message"] for e in driver.get_log("browser")]
            # the graph as it opens (what the layout check measured; the frontend's passing notices hidden for
            # the picture: the "N issues found" toast is read below), then with the Issues panel open (1.5x)
            shot = os.path.join(shot_dir, name.replace(".json", ".png") if name.endswith(".json")
                                else name.replace(".png", ".from-png.png"))
            driver.execute_script(_NOTICES + "t.style.visibility = 'hidden';")
            driver.save_screenshot(shot)
            driver.execute_script(_NOTICES + "t.style.visibility = '';")
            issues = issues_panel(driver)
            if issues:
                driver.save_screenshot(shot.replace(".png", ".issues.png"))
            # what the frontend lacks model files for is no fault of the graph: its "Missing Models" dialog (1.32)
            # or Issues-panel section (1.5x) is reported apart (the shipped workflows name the release files)
            missing_models = [d for d in state["dialogs"] if d.strip().startswith("Missing Models")]
            reported = [d for d in state["dialogs"] if d not in missing_models]
            if issues:
                missing_models += issues["sections"].get("Missing Models", [])
                reported.append(" ".join(sum((v for k, v in issues["sections"].items() if k != "Missing Models"),
                                             [])))
                reported.extend(k for k in issues["sections"] if k != "Missing Models")
            new_text = text.replace(before, "") if before and before in text else text
            results[name] = {
                "loaded": done, "state": state, "console": logs, "screenshot": shot,
                "problems": [m for m in PROBLEM_MARKERS if m.lower() in " ".join(reported).lower()],
                "issues": issues, "text": new_text[-2000:], "missing_models": " ".join(missing_models),
            }
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return results


def search_nodes(url: str, queries: list[str], shot_dir: str | None = None, timeout: float = 90.0) -> dict:
    """Type each query into the frontend's node search (a double click on empty canvas, as a user opens it) and
    return ``{query: text of the results shown}``."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver, profile = _start_browser()
    results = {}
    try:
        _fresh_page(driver, url, timeout)
        driver.execute_script("window.app.graph.clear(); window.app.graph.setDirtyCanvas(true, true);")
        canvas = driver.find_element("css selector", "canvas#graph-canvas, canvas.graph-canvas, canvas")
        for query in queries:
            ActionChains(driver).move_to_element_with_offset(canvas, 0, 0).double_click().perform()
            deadline = time.time() + 10
            while time.time() < deadline and driver.execute_script(
                    "return document.activeElement && document.activeElement.tagName") != "INPUT":
                time.sleep(0.2)
            box = driver.switch_to.active_element
            box.send_keys(query)
            time.sleep(1.5)
            results[query] = driver.execute_script(
                "return Array.from(document.querySelectorAll('[role=option], .p-autocomplete-option, "
                ".litesearchbox .litegraph-entry')).map(e => e.innerText).join('\\n')")
            if shot_dir:
                driver.save_screenshot(os.path.join(shot_dir, f"search-{query.replace(' ', '_')}.png"))
            box.send_keys(Keys.ESCAPE)
            time.sleep(0.5)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return results


_SET_WIDGETS = """
const missing = [];
for (const [id, values] of Object.entries(arguments[0])) {
  const node = window.app.graph.getNodeById(Number(id));
  if (!node) { missing.push(id); continue; }
  for (const [name, value] of Object.entries(values)) {
    const w = (node.widgets || []).find(w => w.name === name);
    if (!w) continue;  // a linked input
    w.value = value;
    if (w.callback) w.callback(value);
  }
}
window.app.graph.setDirtyCanvas(true, true);
return missing;
"""

_OUTPUT_SHOWN = """
const outs = window.app.nodeOutputs || window.app._nodeOutputs || {};
const withImages = Object.values(outs).filter(o => o && o.images && o.images.length).length;
const drawn = window.app.graph._nodes.filter(n => n.imgs && n.imgs.length && n.imgs[0].complete
                                                 && n.imgs[0].naturalWidth > 0).length;
return {with_images: withImages, drawn: drawn};
"""


_TEST_IDS = {"Run": "queue-button"}  # 1.5x frontends: the Run button has a test id and no aria-label


def _click(driver, label: str) -> None:
    from selenium.common.exceptions import ElementClickInterceptedException

    selector = f'button[aria-label="{label}"]'
    if label in _TEST_IDS:
        selector += f', button[data-testid="{_TEST_IDS[label]}"]'
    button = driver.find_element("css selector", selector)
    try:
        button.click()
    except ElementClickInterceptedException:
        driver.save_screenshot("/tmp/x2i-click-intercepted.png")
        raise


def run_workflows(url: str, runs: dict[str, tuple[dict, dict]], shot_dir: str, server_get, timeout: float = 300.0,
                  cancel: tuple[str, dict] | None = None) -> dict:
    """For each ``name: (UI workflow, {node id: {widget: value}})``: load it, set the widgets by name, press
    the frontend's Run button, wait until the output image is shown on its node, screenshot the page.

    ``server_get(path)`` reads the server's JSON (``/history``, ``/queue``). ``cancel = (name, widgets)``:
    first run that workflow with widgets that make it long, press *Cancel current run* while it executes,
    and report that prompt's outcome; the normal runs follow in the same browser."""
    driver, profile = _start_browser()
    results = {}

    def new_prompts(seen):
        return [k for k in server_get("/history") if k not in seen]

    try:
        jobs = list(runs.items())
        if cancel:
            jobs.insert(0, ("cancel:" + cancel[0], (runs[cancel[0]][0], cancel[1])))
        for name, (wf, widgets) in jobs:
            _fresh_page(driver, url, 90.0)
            loaded = _load_graph(driver, name, wf)
            dismiss_first_run(driver, wait=1.0)  # 1.32's Missing Models dialog (the release files), as a user would
            missing = driver.execute_script(_SET_WIDGETS, widgets)
            seen = set(server_get("/history"))
            _click(driver, "Run")
            deadline, new = time.time() + timeout, []
            if name.startswith("cancel:"):
                while (time.time() < deadline and not server_get("/queue")["queue_running"]
                       and not new_prompts(seen)):  # (a prompt refused at validation never runs)
                    time.sleep(0.2)
                time.sleep(6.0)  # past loading and encoding, into the sampler's steps
                _click(driver, "Cancel current run")
                while time.time() < deadline and not (new := new_prompts(seen)):
                    time.sleep(0.3)
                entry = server_get("/history")[new[0]] if new else {}
                results[name] = {"loaded": loaded, "missing": missing, "prompt_ids": new,
                                 "status": entry.get("status", {}), "screenshot": None}
                continue
            shown = {}
            while time.time() < deadline:
                shown = driver.execute_script(_OUTPUT_SHOWN)
                new = new_prompts(seen)
                if shown["drawn"] and new:
                    break
                time.sleep(0.5)
            time.sleep(1.0)
            shot = os.path.join(shot_dir, name.replace(".json", ".run.png"))
            driver.save_screenshot(shot)
            entry = server_get("/history")[new[0]] if new else {}
            results[name] = {"loaded": loaded, "missing": missing, "shown": shown, "prompt_ids": new,
                             "status": entry.get("status", {}), "outputs": entry.get("outputs", {}),
                             "screenshot": shot, "dialogs": _graph_state(driver)["dialogs"]}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return results


if __name__ == "__main__":
    import sys

    url, shot_dir = sys.argv[1], sys.argv[2]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wfs = {}
    for f in sorted(os.listdir(os.path.join(root, "workflows"))):
        if f.endswith(".json"):
            with open(os.path.join(root, "workflows", f), encoding="utf-8") as fh:
                wfs[f] = json.load(fh)
    print(json.dumps(open_workflows(url, wfs, shot_dir), indent=1)[:20000])
