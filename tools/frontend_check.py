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

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

PROBLEM_MARKERS = ("missing nodes", "Workflow Validation", "validation", "Some nodes", "not found",
                   "Missing Node Types", "Invalid workflow", "error loading")


def available() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


def open_workflows(url: str, workflows: dict[str, dict], shot_dir: str, timeout: float = 90.0) -> dict[str, dict]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="x2i-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    results = {}
    try:
        for name, wf in workflows.items():
            driver.get(url + "/")
            # Start from a clean slate: the frontend restores the last workflow from storage.
            driver.execute_script("localStorage.clear(); sessionStorage.clear();")
            driver.get(url + "/")
            deadline = time.time() + timeout
            while time.time() < deadline:
                ready = driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)")
                if ready:
                    break
                time.sleep(0.5)
            else:
                raise TimeoutError("the ComfyUI frontend did not start")
            time.sleep(1.0)
            driver.get_log("browser")  # drop start-up messages
            before = driver.execute_script("return document.body.innerText")
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
            done = driver.execute_script("return window.__x2i_done")
            text = driver.execute_script("return document.body.innerText")
            state = driver.execute_script(
                "const g = window.app.graph; return {nodes: g._nodes.map(n => ({type: n.type, "
                "registered: !!LiteGraph.registered_node_types[n.type], inputs: (n.inputs||[]).length, "
                "outputs: (n.outputs||[]).length, has_errors: !!n.has_errors})), "
                "links: Object.keys(g.links || {}).length, dialogs: Array.from(document.querySelectorAll("
                "'.p-dialog, .p-toast-message')).map(e => e.innerText)}")
            logs = [e["message"] for e in driver.get_log("browser")]
            shot = os.path.join(shot_dir, name.replace(".json", ".png") if name.endswith(".json")
                                else name.replace(".png", ".from-png.png"))
            driver.save_screenshot(shot)
            new_text = text.replace(before, "") if before and before in text else text
            results[name] = {
                "loaded": done, "state": state, "console": logs, "screenshot": shot,
                "problems": [m for m in PROBLEM_MARKERS if m.lower() in " ".join(state["dialogs"]).lower()],
                "text": new_text[-2000:],
            }
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
