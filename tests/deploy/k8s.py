"""Helpers of the deploy tests: render the Helm chart with Helm's own engine (the helm-python-sdk wheel
binds Helm's Go SDK; no helm binary is needed), validate manifests against the Kubernetes JSON schemas
(kubernetes-validate, strict) and custom resources against their CRDs' openAPIV3Schemas (vendored in
deploy/schemas), and name the metrics a PromQL query reads (promql-parser, a port of Prometheus's parser)."""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "triffusion"
ADAPTER_VALUES = ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml"
KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = ROOT / "deploy" / "schemas"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "triffusion.json"
# Kubernetes versions the manifests must validate against: the chart's kubeVersion floor and the newest
# schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "1.37.0")


def need(module: str, package: str):
    return pytest.importorskip(module, reason=f"{package} is not installed (pip install -e '.[test]')")


def render(values: dict | None = None, name: str = "sd", namespace: str = "serving") -> list[dict]:
    """The chart's manifests for these values (Helm's template engine), as parsed objects."""
    helm = need("helm_python", "helm-python-sdk")
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def render_error(values: dict) -> str:
    helm = need("helm_python", "helm-python-sdk")
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError) as caught:
            chart.render(values, name="sd", namespace="serving", is_install=True)
    return str(caught.value)


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = by_kind(docs)[kind]
    return doc


# ---- schemas -----------------------------------------------------------------------------------

def _strict(schema):
    """Close every object schema that lists its properties (kubeconform's -strict, for CRDs): a misspelt
    field fails instead of passing unseen. Objects that keep unknown fields on purpose stay open."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_validators() -> dict[tuple[str, str], object]:
    import jsonschema

    found = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        document = json.loads(path.read_text())
        schema = _strict(document["openAPIV3Schema"])
        found[(f"{document['group']}/{document['version']}", document["kind"])] = jsonschema.Draft7Validator(schema)
    return found


def validate(doc: dict) -> str:
    """Validate one manifest; 'kubernetes' or 'crd' (which schema it met). Raises on an invalid one."""
    kv = need("kubernetes_validate", "kubernetes-validate")
    key = (doc.get("apiVersion"), doc.get("kind"))
    validator = crd_validators().get(key)
    if validator is not None:
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            raise AssertionError(f"{key} {doc['metadata'].get('name')}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
        return "crd"
    for version in KUBE_VERSIONS:
        kv.validate(copy.deepcopy(doc), version, strict=True)
    return "kubernetes"


# ---- metrics -----------------------------------------------------------------------------------

def declared_metrics() -> dict[str, str]:
    """Metric families the orchestrator's MetricsObserver declares: name -> kind (from the code itself)."""
    from triffusion.orchestrator.metrics import MetricsObserver

    found: dict[str, str] = {}

    class Family:
        def __init__(self, name, description, kind):
            found[name] = kind

        def Metric(self, labels, buckets=None):
            return _Nothing()

    MetricsObserver(Family, "counter", "gauge", "histogram")
    return found


class _Nothing:
    def __getattr__(self, name):
        return lambda *a, **k: None


def series_names(families: dict[str, str]) -> set[str]:
    """The sample names Prometheus stores for these families (histograms: _bucket, _sum, _count)."""
    names = set()
    for name, kind in families.items():
        names.update((f"{name}_bucket", f"{name}_sum", f"{name}_count") if kind == "histogram" else (name,))
    return names


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "30m"}


def query_metrics(expr: str) -> set[str]:
    """Metric names a PromQL query reads. Grafana's and prometheus-adapter's placeholders are filled in
    first; a query that is not valid PromQL raises ValueError."""
    promql = need("promql_parser", "promql-parser")
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # dashboard variables sit inside regex matchers
    expr = expr.replace("<<.LabelMatchers>>", 'namespace="serving",pod="sd-0"').replace("<<.GroupBy>>", "pod")
    label_values = re.fullmatch(r"\s*label_values\((\w+)\s*,\s*\w+\)\s*", expr)
    if label_values:  # a Grafana variable query, not PromQL
        return {label_values.group(1)}
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql.walk(promql.parse(expr), visit)
    return names


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
