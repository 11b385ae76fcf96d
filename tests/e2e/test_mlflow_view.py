"""The default job as its user sees it in MLflow: a real `mlflow server` on 127.0.0.1, the run opened in headless
Chromium through the link xcm prints, and the model logged to the run."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from orchestrator import tracking
from orchestrator.train.launch import run_job
from tests.conftest import MlflowServer
from tests.helpers import tiny_spec

STEPS = 6
CHROMIUMS = ("chromium", "chromium-browser")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, local_ray):
    """The default job, shortened, tracked by a real MLflow server (its system metrics sampled every second)."""
    workdir = tmp_path_factory.mktemp("mlflow-view")
    server = MlflowServer(workdir / "mlflow")
    server.start()
    try:
        spec = tiny_spec(
            f"training.steps={STEPS}",
            "training.report_every=3",
            "evaluation.every_steps=3",
            f"tracking.uri={server.uri}",
            "tracking.system_metrics_every_s=1",
            log_model=None,
        )
        yield run_job(spec, workdir), workdir
    finally:
        server.stop()


def rendered_page(url: str) -> tuple[str, str]:
    """The page as headless Chromium leaves it once its scripts are done, and its visible text. The UI draws its
    charts a while after the page loads: a page without any is loaded again with more page time (which runs
    faster than the clock once the page is idle)."""
    chromium = next(filter(None, map(shutil.which, CHROMIUMS)), None)
    if chromium is None:
        pytest.skip("Chromium is not installed here and could not be (.ci/run installs Debian's chromium package)")
    for budget_ms in (120_000, 300_000, 600_000):
        with tempfile.TemporaryDirectory(prefix="xcm-chromium-") as profile:
            dom = subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",  # tests run as root in CI containers
                    "--disable-gpu",
                    f"--user-data-dir={profile}",  # a fresh browser: no remembered choice of the UI's view
                    f"--virtual-time-budget={budget_ms}",
                    "--window-size=1400,1000",
                    "--dump-dom",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            ).stdout
        if chart_titles(dom):
            break
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return dom, html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def chart_titles(dom: str) -> list[str]:
    """The metric keys of the chart cards on the page (each card's heading carries its key as title)."""
    return re.findall(r'<h4 [^>]*title="([^"]+)"', dom)


def tab_link(link: str, tab: str) -> str:
    """A tab of the run's page, reached from the run link xcm prints (its query kept)."""
    page, query = link.split("?")
    return f"{page}/{tab}?{query}"


@pytest.mark.slow
def test_run_link_opens_the_training_view_with_the_runs_metric_charts(finished_run):
    """In a fresh headless Chromium, xcm's run link shows the model-training view (not the GenAI one) with a
    chart per training metric, drawn, and the node's system-metric charts."""
    result, _ = finished_run
    link = tracking.run_link(result.tracking_uri, result.experiment_id, result.run_id)

    metrics = tracking.client(result.tracking_uri).get_run(result.run_id).data.metrics

    dom, text = rendered_page(tab_link(link, "model-metrics"))
    assert "Model registry" in text
    assert "Evaluation runs" not in text  # the GenAI view's sidebar
    for section in ("Model metrics", "clusterability", "eval"):  # the run's metrics, grouped by prefix
        assert f"{section} (" in text, section
    charts = chart_titles(dom)
    assert charts, text[:2000]
    assert set(charts) <= set(metrics), charts
    assert dom.count('class="js-line"') >= len(charts)  # each chart drew its line

    dom, _ = rendered_page(tab_link(link, "system-metrics"))
    assert "system/cpu_utilization_percentage" in chart_titles(dom)


@pytest.mark.slow
def test_logged_model_gives_the_exported_models_logits(finished_run):
    """The model logged to the run, loaded with mlflow.transformers, gives the logits of `xcm export`'s model
    of the run's last checkpoint."""
    import mlflow
    import transformers

    from orchestrator.train.export import export_hf

    result, workdir = finished_run
    client = tracking.client(result.tracking_uri)
    (logged,) = client.get_run(result.run_id).outputs.model_outputs
    mlflow.set_tracking_uri(result.tracking_uri)
    components = mlflow.transformers.load_model(f"models:/{logged.model_id}", return_type="components")
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(result.run_id, workdir / "export", result.tracking_uri)
    ).eval()

    inputs = torch.tensor([components["tokenizer"]("a + b = c; reverse: abc")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(components["model"](input_ids=inputs).logits, exported(input_ids=inputs).logits)
