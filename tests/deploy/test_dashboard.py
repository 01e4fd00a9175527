"""The Grafana dashboard (deploy/monitoring): it loads as a Grafana dashboard (its fields survive a round
trip through grafana-foundation-sdk's dashboard model, generated from Grafana's own schema), and every
panel's PromQL query is valid and reads metrics that a real server exports: a tritonserver serving the tiny
family (the session's server), after a few requests and one supervised stub reload, is scraped."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import numpy as np
import pytest

from triffusion import procs

from .k8s import DASHBOARD, declared_metrics, need, query_metrics, series_names

# Panels the dashboard must have (the list); each is checked for a query and its metrics below.
REQUIRED_PANELS = ("SLO attainment by SLO class", "Goodput", "Queue depth", "UNet batch rows",
                   "Steps used by SLO class", "Cascade escalations", "Adapter cache hits", "Reloads and restarts")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in board["panels"] if p["type"] != "row"}


def test_dashboard_loads_as_a_grafana_dashboard():
    need("grafana_foundation_sdk", "grafana-foundation-sdk")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    board = dashboard()
    back = json.loads(json.dumps(Dashboard.from_json(board), cls=JSONEncoder))

    def dropped(a, b, path=""):  # what Grafana's model did not keep: fields outside its schema
        if isinstance(a, dict):
            return [p for k, v in a.items() for p in ([f"{path}/{k}"] if k not in b else dropped(v, b[k], f"{path}/{k}"))]
        if isinstance(a, list):
            return [p for i, (u, v) in enumerate(zip(a, b)) for p in dropped(u, v, f"{path}[{i}]")] + \
                ([path] if len(a) != len(b) else [])
        return [] if a == b else [f"{path}: {a!r} -> {b!r}"]

    assert dropped(board, back) == []
    assert board["uid"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:  # laid out on Grafana's 24-column grid, without overlaps
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
    cells = [(x, y) for p in board["panels"] for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells))
    queries = panel_queries(board)
    for title in REQUIRED_PANELS:
        assert queries.get(title), title


def test_every_query_reads_metrics_the_orchestrator_declares():
    """Without a server: each panel's and variable's query is valid PromQL over declared metric families."""
    declared = series_names(declared_metrics())
    board = dashboard()
    for title, exprs in panel_queries(board).items():
        for expr in exprs:
            assert query_metrics(expr) <= declared, (title, query_metrics(expr) - declared)
    for variable in board["templating"]["list"]:
        assert query_metrics(variable["query"]["query"]) <= declared


# ---- against a real server -------------------------------------------------------------------------

def infer(url: str, **fields) -> dict:
    """One request to the unary front over HTTP (the edge): its metadata, or raise with the message."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, network_timeout=300)
    try:
        tensors = []
        for name, value in fields.items():
            dtype, array = (("BYTES", np.array([value.encode()], dtype=object)) if isinstance(value, str)
                            else ("INT32", np.array([value], dtype=np.int32)))
            tensor = httpclient.InferInput(name, [1], dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer("text_to_image", tensors, outputs=[httpclient.InferRequestedOutput("metadata")])
        return json.loads(result.as_numpy("metadata")[0])
    finally:
        client.close()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def scraped(server):
    """/metrics of the session's real server after: a request per SLO class and one without, a cascade
    request, a request refused at admission, and a stub that died and was reloaded by the supervisor."""
    for fields in ({"slo_class": "standard"}, {"slo_class": "batch"}, {}, {"unet": "cascade"}):
        metadata = infer(server.http, prompt="a red bicycle", steps=2, **fields)
        assert metadata["steps_done"] >= 1
    with pytest.raises(Exception, match="UNAVAILABLE"):
        infer(server.http, prompt="a red bicycle", steps=50, slo_ms=1)  # an SLO no server can meet
    before = scrape(server.metrics)
    reloads = lambda text: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                               if line.startswith('triffusion_supervisor_actions{action="reload",model="quality_gate"}'))
    (stub,) = procs.stubs_of(server.triton.process.pid, "quality_gate").values()
    os.kill(stub, signal.SIGKILL)
    deadline = time.monotonic() + 180
    text = scrape(server.metrics)
    while reloads(text) <= reloads(before):  # reported once the supervisor has reloaded it
        assert time.monotonic() < deadline, "the supervisor never reported the reload on /metrics"
        time.sleep(0.5)  # polling /metrics: the reload is reported by another process
        text = scrape(server.metrics)
    return text


@pytest.mark.server
def test_every_panel_queries_metrics_a_running_server_exports(scraped):
    exported = sample_names(scraped)
    board = dashboard()
    for title, exprs in panel_queries(board).items():
        for expr in exprs:
            missing = query_metrics(expr) - exported
            assert not missing, f"panel {title!r} queries {sorted(missing)}, which the server does not export"
    for variable in board["templating"]["list"]:
        assert query_metrics(variable["query"]["query"]) <= exported
    # The series the panels break down by are there with their labels.
    for series in ('triffusion_slo_total{met="true",slo_class="standard"}',
                   'triffusion_request_steps_count{slo_class="batch"}',
                   'triffusion_cascade_total{route="heavy"}',
                   'triffusion_supervisor_actions{action="reload",model="quality_gate"}'):
        assert series in scraped, series
