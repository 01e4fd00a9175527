"""The Helm chart (deploy/helm/triffusion), rendered by Helm's own engine and validated against the
Kubernetes schemas and the Prometheus Operator CRDs; the prometheus-adapter rules the autoscaler needs."""

from __future__ import annotations

import copy

import pytest
import yaml

from .k8s import (ADAPTER_VALUES, CHART, ROOT, adapter_rules, by_kind, declared_metrics, need, one,
                  query_metrics, render, render_error, series_names, validate)

REGISTRY = (ROOT / "registry.example.yaml").read_text()
VARIANTS = {
    "defaults": {},
    # Each pod exports its own repository (no shared volume), 2 GPUs a pod, a registry family, a PodMonitor
    # instead of the ServiceMonitor, autoscaling on SLO misses, a headless Service.
    "per-pod export": {"export": {"mode": "initContainer"}, "modelStore": {"persistence": False},
                       "gpusPerPod": 2, "model": {"family": "tiny", "registry": REGISTRY, "sizes": [512]},
                       "metrics": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": True}},
                       "autoscaling": {"metric": "sloMiss"}, "service": {"headless": True}},
    # A repository exported elsewhere onto an existing claim; fixed replicas.
    "existing repository": {"export": {"mode": "none"}, "modelStore": {"existingClaim": "sd15-models"},
                            "autoscaling": {"enabled": False}, "replicas": 3,
                            "serve": {"args": ["--log-verbose", "1"]}},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request):
    return request.param, VARIANTS[request.param], render(VARIANTS[request.param])


def container(pod_spec: dict, name: str) -> dict:
    (found,) = [c for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []) if c["name"] == name]
    return found


def test_every_manifest_validates_against_its_schema(rendered):
    variant, _, docs = rendered
    met = {validate(doc) for doc in docs}
    kinds = set(by_kind(docs))
    assert {"Deployment", "Service"} <= kinds, variant
    assert "crd" in met and "kubernetes" in met, variant  # both kinds of schema were exercised


def test_chart_lints_clean():
    helm = need("helm_python", "helm-python-sdk")
    report = helm.lint(str(CHART), strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report


def test_deployment_requests_gpus_probes_triton_health_and_serves_three_ports(rendered):
    variant, values, docs = rendered
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    triton = container(pod, "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == values.get("gpusPerPod", 1)
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    args = triton["args"]
    for flag, value in (("--http-port", "8000"), ("--grpc-port", "8001"), ("--metrics-port", "8002"),
                        ("--host", "0.0.0.0"), ("--repo", "/models/repository")):
        assert args[args.index(flag) + 1] == value, (variant, flag)
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # Drain on SIGTERM: the pod's grace outlasts `triffusion serve --grace`.
    assert pod["terminationGracePeriodSeconds"] > float(args[args.index("--grace") + 1])
    mounts = {m["name"]: m for m in triton["volumeMounts"]}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert [v for v in pod["volumes"] if v["name"] == "dshm"][0]["emptyDir"]["medium"] == "Memory"
    assert mounts["models"]["mountPath"] == "/models"
    if "--log-verbose" in values.get("serve", {}).get("args", []):
        assert args[-2:] == ["--log-verbose", "1"]
    if values.get("autoscaling", {}).get("enabled", True):
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
    else:
        assert deployment["spec"]["replicas"] == values["replicas"]


def test_export_writes_the_repository_that_the_server_reads(rendered):
    variant, values, docs = rendered
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mode = values.get("export", {}).get("mode", "job")
    kinds = by_kind(docs)
    if mode == "none":
        assert "Job" not in kinds and not pod.get("initContainers")
        claim = [v for v in pod["volumes"] if v["name"] == "models"][0]["persistentVolumeClaim"]["claimName"]
        assert claim == values["modelStore"]["existingClaim"] and "PersistentVolumeClaim" not in kinds
        return
    if mode == "job":
        job = one(docs, "Job")
        export_pod = job["spec"]["template"]["spec"]
        # Serving pods wait for the marker this configuration's Job writes; both share the claim.
        marker = job["metadata"]["name"].rsplit("-", 1)[-1]
        assert f"export-{marker}.done" in " ".join(container(export_pod, "export")["command"])
        assert f"export-{marker}.done" in " ".join(container(pod, "wait-for-export")["command"])
        claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
        for spec in (export_pod, pod):
            assert [v for v in spec["volumes"] if v["name"] == "models"][0]["persistentVolumeClaim"]["claimName"] == claim
        assert container(pod, "triton")["volumeMounts"][0]["readOnly"] is True
    else:
        export_pod = pod
        assert "Job" not in kinds and "PersistentVolumeClaim" not in kinds
        assert [v for v in pod["volumes"] if v["name"] == "models"][0] == {"name": "models", "emptyDir": {}}
    export = container(export_pod, "export")
    assert export["resources"]["limits"]["nvidia.com/gpu"] == 1  # engines are built on the GPU they serve on
    args = export["args"]
    assert args[args.index("--out") + 1] == "/models/repository"
    assert args[args.index("--target") + 1] == "ngc"
    sizes = values.get("model", {}).get("sizes", [512, 768])
    assert args[args.index("--sizes") + 1] == ",".join(map(str, sizes))
    if values.get("model", {}).get("family"):
        assert args[args.index("--family") + 1] == "tiny" and "--model" not in args
        registry_path = args[args.index("--registry") + 1]
        configmap = one(docs, "ConfigMap")
        assert yaml.safe_load(configmap["data"]["registry.yaml"]) == yaml.safe_load(REGISTRY)
        mount = [m for m in export["volumeMounts"] if m["name"] == "registry"][0]["mountPath"]
        assert registry_path == f"{mount}/registry.yaml"
        assert [v for v in export_pod["volumes"] if v["name"] == "registry"][0]["configMap"]["name"] == \
            configmap["metadata"]["name"]
    else:
        assert args[args.index("--model") + 1] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_a_new_export_configuration_makes_a_new_job_and_rolls_the_pods():
    base, bigger = render(), render({"model": {"sizes": [512, 768, 1024]}})
    assert one(base, "Job")["metadata"]["name"] != one(bigger, "Job")["metadata"]["name"]
    annotation = lambda docs: one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["triffusion/export"]
    assert annotation(base) != annotation(bigger)
    assert annotation(base) == annotation(render({"gpusPerPod": 4}))  # serving-only changes keep the export


def test_service_and_monitors_reach_the_pods_ports(rendered):
    variant, values, docs = rendered
    pod_template = one(docs, "Deployment")["spec"]["template"]
    triton = container(pod_template["spec"], "triton")
    service = one(docs, "Service")
    labels = pod_template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", 8000, "http"), ("grpc", 8001, "grpc"), ("metrics", 8002, "metrics")}
    assert (service["spec"].get("clusterIP") == "None") == values.get("service", {}).get("headless", False)
    kinds = by_kind(docs)
    if values.get("metrics", {}).get("podMonitor", {}).get("enabled"):
        assert "ServiceMonitor" not in kinds
        monitor = one(docs, "PodMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in {p["name"] for p in triton["ports"]} and endpoint["path"] == "/metrics"
    else:
        monitor = one(docs, "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["serving"]


def test_autoscaler_reads_a_metric_that_prometheus_adapter_serves(rendered):
    variant, values, docs = rendered
    if not values.get("autoscaling", {}).get("enabled", True):
        assert "HorizontalPodAutoscaler" not in by_kind(docs)
        return
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": one(docs, "Deployment")["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
    expected = {"sloMiss": "triffusion_slo_miss_ratio"}.get(values.get("autoscaling", {}).get("metric"),
                                                            "triffusion_queue_seconds")
    assert metric["pods"]["metric"]["name"] == expected
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300  # GPU pods start slowly


def test_every_adapter_rule_is_valid_promql_over_metrics_the_server_declares():
    exported = series_names(declared_metrics())
    names = [rule["name"]["as"] for rule in adapter_rules()]
    assert sorted(names) == ["triffusion_queue_depth", "triffusion_queue_seconds", "triffusion_slo_miss_ratio"]
    for rule in adapter_rules():
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        series = query_metrics(rule["seriesQuery"])
        used = query_metrics(rule["metricsQuery"])
        assert series <= exported and used <= exported, (rule["name"]["as"], (series | used) - exported)
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    # The chart's HPA metric names and the adapter's agree for every choice the values offer.
    for choice, name in (("queueTime", "triffusion_queue_seconds"), ("queueDepth", "triffusion_queue_depth"),
                         ("sloMiss", "triffusion_slo_miss_ratio")):
        hpa = one(render({"autoscaling": {"metric": choice}}), "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == name
    assert yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["default"] is False


@pytest.mark.parametrize("values, message", [
    ({"export": {"mode": "sometimes"}}, "export.mode must be job, initContainer or none"),
    ({"modelStore": {"persistence": False}}, "export.mode"),
    ({"autoscaling": {"metric": "cpu"}}, "autoscaling.metric must be queueTime, queueDepth or sloMiss"),
    ({"model": {"family": "tiny"}}, "model.family needs model.registry"),
])
def test_inconsistent_values_fail_with_a_message_naming_them(values, message):
    assert message in render_error(values)


def test_the_validators_catch_a_misspelt_field():
    """The schema checks above can fail: a typo in a built-in kind and in a custom resource."""
    kv = need("kubernetes_validate", "kubernetes-validate")
    docs = render()
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        validate(deployment)
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="intervall"):
        validate(monitor)
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"] = "metrics"
    with pytest.raises(AssertionError, match="endpoints"):
        validate(monitor)
