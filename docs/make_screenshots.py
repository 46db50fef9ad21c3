"""Make the screenshots of docs/ui.md again: a real run, seen in the Prefect and MLflow UIs.

    .venv/bin/python docs/make_screenshots.py                # the demo preset (make run), PNGs into docs/img/
    .venv/bin/python docs/make_screenshots.py --keep         # ... and leave both servers up to browse
    .venv/bin/python docs/make_screenshots.py --browse       # the run and the servers, no screenshots

Starts a Prefect server (UI included) and an MLflow server on free loopback ports, in a temporary
FEDPRUNE_HOME; runs `fedprune run --preset demo --run-id ui-demo` against them; registers the run's
MLflow model; then opens each page in headless Chromium (Debian's `chromium` package:
``sudo apt-get install -y chromium``) and writes one small PNG per page. The servers are stopped
at the end (with ``--keep``, on Enter).
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from websockets.sync.client import connect  # noqa: E402

from infra.settings import LOOPBACK  # noqa: E402
from infra.stack import (  # noqa: E402
    ServiceSpec,
    free_loopback_port,
    mlflow_spec,
    prefect_spec,
    read_pid,
    start_service,
    stop_service,
    wait_healthy,
)
from infra.tracking import find_run, mlflow_client, run_url  # noqa: E402

RUN_ID = "ui-demo"
MODEL_NAME = "fedprune-speech"
WIDTH, HEIGHT = 1400, 900
MAX_COLORS = 256
"""PNGs are saved with a palette of at most this many colours (UI pages need few): tens of KB each."""


SETTLE_S = 3.0
"""Seconds a page gets after its text showed (charts drawn, images loaded) before it is captured."""


@dataclass(frozen=True)
class Page:
    """A screenshot: its file name, its address, a text the page shows once its data is in, what to
    click then (CSS selectors, or ``text=<an element's whole text>``), and the window height."""

    name: str
    url: str
    shows: str
    clicks: tuple[str, ...] = ()
    height: int = HEIGHT


@contextmanager
def service(spec: ServiceSpec, run_dir: Path) -> Iterator[ServiceSpec]:
    """`spec` running until the block ends."""
    pid = start_service(spec, run_dir, die_with_parent=True)
    try:
        wait_healthy(spec, pid, run_dir, timeout_s=180)
        yield spec
    finally:
        if read_pid(run_dir, spec.name) is not None:
            stop_service(run_dir, spec.name)


def chromium() -> str:
    """The Chromium executable, or exit naming how to install it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("headless Chromium is needed for the screenshots: install Debian's package "
             "(sudo apt-get install -y chromium) and run this again")


class Browser:
    """Headless Chromium with one tab, driven over the DevTools protocol (`websockets`, a Prefect dependency).

    Pages are single-page apps that fetch their data after loading: `shoot` waits until the page
    shows a given text, clicks what the page lists, then captures it.
    """

    def __init__(self, executable: str, profile: Path) -> None:
        port = free_loopback_port()
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.socket = connect(self._page_socket(port), max_size=None)
        self.ids = itertools.count(1)

    def _page_socket(self, port: int, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/json/list", timeout=2) as answer:
                    pages = [t for t in json.loads(answer.read()) if t["type"] == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"chromium did not open its DevTools port {port} within {timeout_s:.0f} s")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=20)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, script: str) -> Any:
        return self.call("Runtime.evaluate", expression=script, returnByValue=True).get("result", {}).get("value")

    def wait_for_text(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
            if time.monotonic() > deadline:
                shown = str(self.evaluate("document.body ? document.body.innerText.slice(0, 300) : ''"))
                raise TimeoutError(f"the page never showed {text!r} within {timeout_s:.0f} s; it shows: {shown!r}")
            time.sleep(0.5)

    def click(self, selector: str) -> None:
        """Click the first element matching CSS `selector`, or whose whole text is `selector` after ``text=``;
        after ``?``, only if there is one (a panel the browser's profile may already have closed)."""
        optional = selector.startswith("?")
        selector = selector.removeprefix("?")
        if selector.startswith("text="):  # the first innermost element with that text
            find = (f"(a => a.find(x => !a.some(y => y !== x && x.contains(y))))([...document.querySelectorAll("
                    f"'body *')].filter(e => e.textContent.trim() === {json.dumps(selector[5:])}))")
        else:
            find = f"document.querySelector({json.dumps(selector)})"
        clicked = self.evaluate(f"(() => {{ const e = {find}; if (!e) return false; e.click(); return true; }})()")
        if not clicked and not optional:
            raise LookupError(f"nothing to click on the page matches {selector!r}")
        time.sleep(1.5)

    def shoot(self, page: Page, out: Path) -> Path:
        """`page` as a palette PNG at `out/page.name`."""
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=page.height, deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url="about:blank")  # a fresh app: the same address again would keep its state
        self.call("Page.navigate", url=page.url)
        self.wait_for_text(page.shows)
        for selector in page.clicks:
            self.click(selector)
        time.sleep(SETTLE_S)
        target = out / page.name
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            small = image.convert("RGB").quantize(colors=MAX_COLORS, method=Image.Quantize.MEDIANCUT)
        small.save(target, optimize=True)
        return target


def fedprune(env: dict[str, str], *args: str) -> None:
    """Run `fedprune <args>`; exit with its last output lines if it fails."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"fedprune {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def prefect_flow_runs(api: str) -> list[dict[str, Any]]:
    """The server's flow runs, oldest first."""
    body = json.dumps({"sort": "START_TIME_ASC", "limit": 50}).encode()
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        runs: list[dict[str, Any]] = json.loads(answer.read())
    return runs


def prefect_ui(url: str) -> str:
    """Where the Prefect server serves its default UI (``/v2`` in Prefect 3.8)."""
    with urllib.request.urlopen(f"{url}/ui-settings", timeout=30) as answer:
        settings = json.loads(answer.read())
    return url + settings.get(f"{settings.get('default_ui', 'v1')}_base_url", "/").rstrip("/")


def pages(
    prefect: str, mlflow: str, experiment_id: str, mlflow_run_id: str, flow_runs: list[dict[str, Any]]
) -> list[Page]:
    """The pages docs/ui.md shows."""
    run = run_url(mlflow, experiment_id, mlflow_run_id)
    base, query = run.split("?")
    parent = next(r for r in flow_runs if r["parent_task_run_id"] is None)
    segment = next(r for r in flow_runs if r["parent_task_run_id"] is not None)
    close_assistant = '?[data-component-id="mlflow.assistant.chat_panel.close"]'
    return [
        Page("mlflow-runs.png", f"{mlflow}/#/experiments/{experiment_id}/runs?{query}", RUN_ID, (close_assistant,)),
        Page("mlflow-run.png", run, "fedprune.phase", height=1250),
        Page("mlflow-metrics.png", f"{base}/model-metrics?{query}", "bytes_down", height=1100),
        Page("mlflow-heatmap.png", f"{base}/artifacts?{query}", "plots",
             ("text=plots", "text=layer_sparsity.png")),
        Page("mlflow-plots.png", f"{base}/artifacts?{query}", "plots", ("text=plots", "text=mask_changes.png")),
        Page("mlflow-model.png", f"{base}/artifacts?{query}", "model", ("text=model", "text=MLmodel")),
        Page("mlflow-registry.png", f"{mlflow}/#/models/{MODEL_NAME}/versions/1?{query}", MODEL_NAME),
        Page("prefect-runs.png", f"{prefect}/runs", parent["name"]),
        Page("prefect-flow-run.png", f"{prefect}/runs/flow-run/{parent['id']}", parent["name"], height=1000),
        Page("prefect-segment.png", f"{prefect}/runs/flow-run/{segment['id']}", segment["name"], height=1000),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="the run's preset (default demo, what make run runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--home", type=Path, help="FEDPRUNE_HOME, for its corpus cache (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the servers up until Enter")
    parser.add_argument("--browse", action="store_true", help="no screenshots: run, then keep the servers up")
    args = parser.parse_args()
    executable = chromium()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedprune-ui-")))
        prefect_port, mlflow_port = free_loopback_port(), free_loopback_port()
        spec = prefect_spec(tmp / "prefect", prefect_port)  # its UI asks its own API, not the default port's
        prefect = stack.enter_context(service(replace(spec, env={**spec.env, "PREFECT_UI_API_URL": f"{spec.url}/api"}),
                                              tmp))
        tracking = stack.enter_context(service(
            mlflow_spec(tmp, mlflow_port, f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "artifacts")), tmp))
        env = {**os.environ, "FEDPRUNE_HOME": str(args.home or tmp / "home"), "PREFECT_API_URL": f"{prefect.url}/api",
               "FEDPRUNE_STORAGE_URL": (tmp / "storage").as_uri(), "FEDPRUNE_TRACKING_URI": tracking.url,
               "PYTHONPATH": str(ROOT)}
        print(f"Prefect UI {prefect.url}, MLflow UI {tracking.url}; running preset {args.preset} ...", flush=True)
        fedprune(env, "run", "--preset", args.preset, "--run-id", RUN_ID)
        client = mlflow_client(tracking.url)
        experiment = client.get_experiment_by_name("fedprune")
        mlflow_run_id = find_run(client, "fedprune", RUN_ID)
        assert experiment is not None and mlflow_run_id is not None, "the run is in MLflow once it finished"
        os.environ["MLFLOW_TRACKING_URI"] = tracking.url
        import mlflow

        mlflow.register_model(f"runs:/{mlflow_run_id}/model", MODEL_NAME)
        if args.browse:
            input(f"Prefect UI {prefect.url}, MLflow UI {tracking.url}: press Enter to stop them ")
            return
        args.out.mkdir(parents=True, exist_ok=True)
        browser = Browser(executable, tmp / "chromium")
        stack.callback(browser.close)
        flow_runs = prefect_flow_runs(f"{prefect.url}/api")
        for page in pages(prefect_ui(prefect.url), tracking.url, experiment.experiment_id, mlflow_run_id, flow_runs):
            print(f"{browser.shoot(page, args.out)}  {page.url}", flush=True)
        if args.keep:
            input(f"Prefect UI {prefect.url}, MLflow UI {tracking.url}: press Enter to stop them ")


if __name__ == "__main__":
    main()
