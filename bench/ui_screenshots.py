"""Screenshots of the MLflow UI in headless Chromium: what a user sees of `make demo`'s runs.

Starts `mlflow ui` on a free 127.0.0.1 port with the given store, drives Debian's Chromium
with Playwright (no `playwright install`: the system browser), saves one PNG per page and
checks that each page shows what the README promises. Exits 1 naming every missing element.

    make ui-screenshots                      # after `make demo`: ./mlflow.db -> docs/ui/
    python bench/ui_screenshots.py --store sqlite:///other.db --output /tmp/ui --experiment demo

Needs the `ui` extra (`pip install -e '.[ui]'`: Playwright's Python package) and Chromium
(`apt-get install chromium`). Reads the store; writes only the screenshots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import mlflow  # noqa: E402

from server.tracking import CLIENT_VARIABLES, healthy, stop  # noqa: E402
from training.metric_keys import HEADLINE_METRICS  # noqa: E402
from training.tracking import HEADLINE_VIEW, SAVED_VIEW_TAG  # noqa: E402

log = logging.getLogger("ui_screenshots")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
ML_VIEW = "workflowType=machine_learning"  # a new browser otherwise opens the GenAI view
HEADLINE = HEADLINE_METRICS[:3]  # the k-fold job's headline columns, checked in the table
TIMEOUT_MS = 60_000


@dataclass
class Demo:
    """The runs and versions of one `make demo`, found in the store."""

    experiment_id: str
    kfold: mlflow.entities.Run
    folds: list[mlflow.entities.Run]
    promote: mlflow.entities.Run | None
    predict: mlflow.entities.Run | None
    version: mlflow.entities.model_registry.ModelVersion | None
    model_name: str


@dataclass
class Report:
    """Screenshots taken and expected elements missing."""

    shots: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            log.error("missing: %s", what)
            self.missing.append(what)


def find_demo(client: mlflow.MlflowClient, experiment: str, model_name: str, alias: str) -> Demo:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in the store (run `make demo`)")
    ids = [exp.experiment_id]
    kfolds = client.search_runs(
        ids, "tags.job = 'kfold' and attributes.status = 'FINISHED'", order_by=["start_time DESC"]
    )
    if not kfolds:
        raise SystemExit(f"error: no finished k-fold job in experiment {experiment!r}")
    kfold = kfolds[0]
    children = client.search_runs(ids, f"tags.mlflow.parentRunId = '{kfold.info.run_id}'")
    folds = sorted(
        (r for r in children if r.data.tags.get("fold", "").isdigit()),
        key=lambda r: int(r.data.tags["fold"]),
    )

    def newest(job: str) -> mlflow.entities.Run | None:
        runs = client.search_runs(ids, f"tags.job = '{job}'", order_by=["start_time DESC"])
        return runs[0] if runs else None

    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        version = None
    return Demo(
        exp.experiment_id, kfold, folds, newest("promote"), newest("predict"), version, model_name
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_ui(store: str, log_file: Path) -> Iterator[str]:
    """`mlflow ui` on a free 127.0.0.1 port with `store`; stopped (its process group) after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner processes
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_file.read_text(errors="replace")[-2000:]
                raise SystemExit(f"error: mlflow ui did not start on {url}:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc.pid)


# Run in every page before the app: MLflow's telemetry SharedWorker keeps a request open
# forever (Playwright never sees the network go idle), and the assistant panel would take a
# third of the width on a new browser.
INIT_SCRIPT = """
window.SharedWorker = undefined;
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
"""


class UI:
    """One fresh headless Chromium profile on one `mlflow ui`; a new tab per screenshot."""

    def __init__(self, context, base_url: str, output: Path, report: Report) -> None:
        self.context, self.base_url, self.output, self.report = context, base_url, output, report

    def open(self, route: str, **query: str):
        """A new tab on `route` (the SPA's hash route) in the model-training view, once the
        network is idle."""
        params = "&".join([ML_VIEW, *(f"{k}={quote(v)}" for k, v in query.items())])
        page = self.context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{self.base_url}/#{route}?{params}", wait_until="networkidle")
        return page

    def settle(self, page) -> None:
        """After a click: the requests it started, then the charts' drawing."""
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(1500)

    def shoot(self, page, name: str, what: str, clip: dict | None = None) -> None:
        self.settle(page)
        path = self.output / f"{name}.png"
        page.screenshot(path=str(path), clip=clip)
        self.report.shots.append((path.name, what))
        page.close()

    def visible(self, page, selector: str, timeout_ms: int = 15_000) -> bool:
        try:
            page.locator(selector).first.wait_for(state="visible", timeout=timeout_ms)
            return True
        except Exception:  # noqa: BLE001 - Playwright's TimeoutError: reported as missing
            return False


def choose_model_training_view(ui: UI, demo: Demo) -> None:
    """Click the 'Model training' switch once, as a user does: the browser remembers it. The
    ?workflowType= of a link holds for that page only; links inside the UI drop it, and
    without the switch a run opened from the table shows in the GenAI view ("Evaluations")."""
    page = ui.context.new_page()
    page.goto(f"{ui.base_url}/#/experiments", wait_until="networkidle")
    page.get_by_text("Model training", exact=True).first.click()
    ui.settle(page)
    run = f"/experiments/{demo.experiment_id}/runs/{demo.kfold.info.run_id}"
    page.goto(f"{ui.base_url}/#{run}", wait_until="networkidle")  # no ?workflowType
    genai = ui.visible(page, "text=Evaluation runs", timeout_ms=2000)  # GenAI's side menu
    ui.report.expect(
        ui.visible(page, "a:text-is('Runs')") and not genai,
        "after the 'Model training' switch, a run page without ?workflowType is a training run",
    )
    page.close()


SECTION_HEADER = "[data-testid='experiment-view-compare-runs-section-header']"
CHART_CARD = "[data-testid='experiment-view-compare-runs-card']"
CHART_SEARCH = "input[placeholder='Search metric charts']"
EXPAND_ROW = "button[data-component-id$='runnamecellrenderer.tsx_46']"  # the +/- of a parent


def run_link(run_name: str) -> str:
    """The selector of a run's link in the runs table, by its exact name."""
    return f".ag-row a:has(:text-is({json.dumps(run_name)}))"


def row(page, run_name: str):
    """The table row (name column) of a run, by its exact name."""
    return page.locator(f".ag-row:has(a :text-is({json.dumps(run_name)}))")


def expand(ui: UI, page, parent: str, child: str) -> None:
    """Show a job's nested runs (the browser remembers expanded rows: click only if needed)."""
    if not ui.visible(page, run_link(child), timeout_ms=3000):
        row(page, parent).locator(EXPAND_ROW).first.click()


def section_names(page) -> list[str]:
    """The chart sections, top to bottom (name without its chart count)."""
    headers = page.locator(SECTION_HEADER)
    headers.first.wait_for(state="visible")
    return [text.split("\n")[0].strip() for text in headers.all_inner_texts()]


def pick_columns(page, metrics: tuple[str, ...]) -> None:
    """Tick metric columns in the table's column picker, as a user does (old stores whose
    experiment has no headline view)."""
    page.locator("button[data-component-id$='runscolumnselector.tsx_315']").click()
    for key in metrics:
        page.locator("input[placeholder='Search columns']").fill(key)
        node = page.locator(f".du-bois-light-tree-treenode:has(strong:text-is('{key}'))")
        node.locator(".du-bois-light-tree-checkbox").first.click()
    page.keyboard.press("Escape")


def runs_table(ui: UI, demo: Demo) -> None:
    """(a) The demo experiment's runs: named jobs with the headline metric columns (the
    experiment's saved view "headline metrics"), the k-fold job expanded to its folds."""
    expect = ui.report.expect
    tags = mlflow.MlflowClient().get_experiment(demo.experiment_id).tags
    has_view = f"{SAVED_VIEW_TAG}{HEADLINE_VIEW}" in tags
    expect(has_view, "the experiment's saved view 'headline metrics' (experiment tag)")
    query = {"viewStateShareKey": HEADLINE_VIEW} if has_view else {}
    page = ui.open(f"/experiments/{demo.experiment_id}/runs", **query)
    if not has_view:
        pick_columns(page, HEADLINE)
    name = demo.kfold.info.run_name
    expect(ui.visible(page, run_link(name)), f"runs table: run {name!r}")
    for key in HEADLINE:
        header = f".ag-header-cell[col-id='metrics.`{key}`']"
        expect(ui.visible(page, header), f"runs table: column {key}")
    expand(ui, page, name, demo.folds[0].info.run_name)
    for fold in demo.folds:
        fold_name = fold.info.run_name
        expect(ui.visible(page, run_link(fold_name)), f"runs table: {fold_name}")
    ui.shoot(page, "01_runs_table", f"runs table, view 'headline metrics', {name!r} expanded")


def fold_metrics(ui: UI, demo: Demo) -> None:
    """(b) One fold run's Model metrics tab: curves (train/, val/, per class) first, the
    one-value summaries ("Model metrics") after them."""
    expect = ui.report.expect
    fold = demo.folds[0]
    route = f"/experiments/{demo.experiment_id}/runs/{fold.info.run_id}/model-metrics"
    page = ui.open(route)
    sections = section_names(page)
    log.info("sections of %s: %s", fold.info.run_name, sections)
    expect(sections[:2] == ["train", "val"], f"fold metrics: first sections train, val: {sections}")
    curves = [s for s in sections if s not in ("Model metrics", "System metrics")]
    expect(
        "Model metrics" in sections and sections.index("Model metrics") == len(curves),
        f"fold metrics: 'Model metrics' right after the curve sections: {sections}",
    )
    expect(ui.visible(page, "text=Runs >> nth=0"), "fold metrics: breadcrumb 'Runs' (not GenAI)")
    ui.shoot(page, "02_fold_metrics", f"{fold.info.run_name}: Model metrics tab, curves first")


def fold_comparison(ui: UI, demo: Demo) -> None:
    """(c) Chart view of the job's fold runs on the per-class F1 curves: one line per fold."""
    expect = ui.report.expect
    job = demo.kfold
    query = {"compareRunsMode": "CHART", "searchFilter": f"tags.kfold_parent = '{job.info.run_id}'"}
    page = ui.open(f"/experiments/{demo.experiment_id}/runs", **query)
    expand(ui, page, job.info.run_name, demo.folds[0].info.run_name)  # else no fold lines
    hide = row(page, job.info.run_name).locator("label:has(input.is-visibility-toggle-checkbox)")
    if hide.locator("input").first.is_checked():
        hide.first.click()  # the job itself has no curve: out of the legends
    page.locator(CHART_SEARCH).fill("val_f1/")
    ui.settle(page)
    sections = section_names(page)
    expect(sections[:1] == ["val_f1"], f"fold comparison: val_f1 section first: {sections}")
    first_chart = page.locator(CHART_CARD).first
    # Lines counted by their drawn path, not their colour: the UI picks a run's colour from
    # its id, and two of five folds can get the same blue.
    lines = first_chart.evaluate(
        "card => new Set([...card.querySelectorAll('path.js-line')]"
        ".filter(p => Number(p.style.strokeOpacity || 1) > 0.5).map(p => p.getAttribute('d'))).size"
    )
    expect(
        lines == len(demo.folds),
        f"fold comparison: one line per fold in the first val_f1 chart ({lines} lines)",
    )
    ui.shoot(page, "03_fold_f1_per_class", "chart view: val_f1/<class>, one line per fold")


def confusion_images(ui: UI, demo: Demo) -> None:
    """The folds' confusion_matrix images (chart view), with the step slider. The image card
    lists every parameter of each run above its image by default (about 40 here, which
    hides the image in the card): switched off in the card's settings, as a user would."""
    expect = ui.report.expect
    job = demo.kfold
    query = {"compareRunsMode": "CHART", "searchFilter": f"tags.kfold_parent = '{job.info.run_id}'"}
    page = ui.open(f"/experiments/{demo.experiment_id}/runs", **query)
    expand(ui, page, job.info.run_name, demo.folds[0].info.run_name)
    page.locator(CHART_SEARCH).fill("confusion")
    ui.settle(page)
    card = page.locator(CHART_CARD).first
    expect(ui.visible(page, f"{CHART_CARD} img"), "confusion_matrix: an image in the chart")
    expect(ui.visible(page, f"{CHART_CARD} [role='slider']"), "confusion_matrix: step slider")
    card.locator("[data-testid='experiment-view-compare-runs-card-menu']").click()
    page.locator("[data-testid='experiment-view-compare-runs-card-edit']").click()
    switch = page.locator(
        "[data-component-id='mlflow.charts.image_grid_configure.show_run_params'] "
        "button[role='switch'], button[role='switch'][data-component-id="
        "'mlflow.charts.image_grid_configure.show_run_params']"
    ).first
    if switch.get_attribute("aria-checked") == "true":
        switch.click()
    page.get_by_role("button", name="Save changes").click()
    ui.settle(page)
    card.locator("button[data-component-id='fullscreen_button_chartcard']").click()
    slider = page.locator("[role='slider']").last.locator("xpath=ancestor::span[@dir='ltr']")
    track = slider.first.bounding_box()
    page.mouse.click(track["x"] + track["width"] - 1, track["y"] + track["height"] / 2)  # last
    ui.shoot(page, "04_confusion_matrix", "chart view: confusion_matrix images per fold, slider")


def artifact(ui: UI, demo: Demo, run, path: str, name: str, what: str) -> None:
    """(d) An artifact in the run's Artifacts tab (images are shown, JSON tables as tables)."""
    route = f"/experiments/{demo.experiment_id}/runs/{run.info.run_id}/artifacts/{path}"
    page = ui.open(route)
    shown = "img" if path.endswith(".png") else "table, [role='table'], .ag-root"
    ui.report.expect(
        ui.visible(page, f"text={path.rsplit('/', 1)[-1]} >> nth=0") and ui.visible(page, shown),
        f"artifact {path} of {run.info.run_name!r} shown",
    )
    ui.shoot(page, name, what)


def champion(ui: UI, demo: Demo) -> None:
    """(e) The registered model, the champion version (alias, description) and its source
    model with the out-of-fold and test metrics."""
    expect = ui.report.expect
    version = demo.version
    if version is None:
        expect(False, f"registered model {demo.model_name!r} with the champion alias")
        return
    page = ui.open(f"/models/{demo.model_name}")
    expect(ui.visible(page, "text=@ champion"), "registered model: alias @ champion")
    ui.shoot(page, "06_registered_model", f"Model registry: {demo.model_name}, its versions")
    page = ui.open(f"/models/{demo.model_name}/versions/{version.version}")
    expect(ui.visible(page, "text=Out-of-fold macro F1"), "champion version: its description")
    ui.shoot(page, "07_champion_version", f"version {version.version} (@champion): description")
    model_id = version.source.rsplit("/", 1)[-1]  # models:/m-...
    page = ui.open(f"/experiments/{demo.experiment_id}/models/{model_id}")
    page.get_by_placeholder("Search metrics").fill("macro")  # OOF and test, not the other 12
    for key in ("oof_f1_macro", "test_f1_macro"):
        expect(ui.visible(page, f"text={key}"), f"champion's model page: metric {key}")
    expect(ui.visible(page, "text=Out-of-fold macro F1"), "champion's model page: description")
    ui.shoot(page, "08_champion_model", "the champion's logged model: OOF and test metrics")


def take_screenshots(store: str, output: Path, demo: Demo) -> Report:
    from playwright.sync_api import sync_playwright  # the `ui` extra

    report = Report()
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-shots-") as scratch:
        with mlflow_ui(store, Path(scratch) / "mlflow-ui.log") as base_url:
            with sync_playwright() as playwright:
                context = playwright.chromium.launch_persistent_context(
                    str(Path(scratch) / "profile"),  # a fresh browser: as a new user sees it
                    executable_path=CHROMIUM,
                    args=CHROMIUM_FLAGS,
                    headless=True,
                    viewport=VIEWPORT,
                )
                context.add_init_script(INIT_SCRIPT)
                ui = UI(context, base_url, output, report)
                try:
                    for page in pages(demo):
                        attempt(ui, page)
                finally:
                    context.close()
    return report


def pages(demo: Demo) -> list:
    """What to show, in order: each a function of the UI."""
    shown = [
        lambda ui: choose_model_training_view(ui, demo),
        lambda ui: runs_table(ui, demo),
        lambda ui: fold_metrics(ui, demo),
        lambda ui: fold_comparison(ui, demo),
        lambda ui: confusion_images(ui, demo),
        lambda ui: artifact(
            ui,
            demo,
            demo.kfold,
            "evaluation/misclassified.png",
            "05_misclassified",
            "k-fold job: out-of-fold misclassified contact sheet",
        ),
        lambda ui: champion(ui, demo),
    ]
    if demo.predict is not None:
        shown.append(
            lambda ui: artifact(
                ui,
                demo,
                demo.predict,
                "evaluation/comparison.json",
                "09_predict_comparison",
                "predict run: comparison table (members, voting, TTA, T)",
            )
        )
    return shown


def attempt(ui: UI, show) -> None:
    """One page; an element that never appears (a click that times out) is reported as
    missing and the next page is still taken."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        show(ui)
    except PlaywrightError as err:
        first_line = str(err).splitlines()[0]
        ui.report.expect(False, f"{getattr(show, '__name__', 'page')}: {first_line}")
        for page in ui.context.pages:
            page.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="tracking store URI")
    parser.add_argument("--output", default="docs/ui", type=Path, help="screenshot folder")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--model_name", default="image-classifier")
    parser.add_argument("--alias", default="champion")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    mlflow.set_tracking_uri(args.store)
    client = mlflow.MlflowClient()
    demo = find_demo(client, args.experiment, args.model_name, args.alias)
    report = take_screenshots(args.store, args.output, demo)
    for name, what in report.shots:
        print(f"{args.output / name}: {what}")
    if report.missing:
        print(f"error: {len(report.missing)} expected element(s) missing:", file=sys.stderr)
        for what in report.missing:
            print(f"  - {what}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
