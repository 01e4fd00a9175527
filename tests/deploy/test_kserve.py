"""The KServe example (deploy/kserve): an InferenceService on KServe's Triton runtime, validated against
KServe's CRD schema, and the PVC + export Job that fill its model repository."""

from __future__ import annotations

import yaml

from .k8s import KSERVE, by_kind, one, validate


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d]


def test_kserve_manifests_validate():
    met = {validate(doc) for name in ("models.yaml", "inferenceservice.yaml") for doc in load(name)}
    assert met == {"kubernetes", "crd"}


def test_inference_service_runs_triffusion_on_the_triton_runtime_over_the_exported_repository():
    isvc = one(load("inferenceservice.yaml"), "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["runtime"] == "kserve-tritonserver"
    assert model["image"].startswith("triffusion-serve:") and model["command"] == ["triffusion", "serve"]
    args = model["args"]
    # KServe mounts storageUri at /mnt/models and routes HTTP to 8080 and gRPC to 9000.
    assert args[args.index("--repo") + 1] == "/mnt/models"
    assert args[args.index("--http-port") + 1] == "8080" and args[args.index("--grpc-port") + 1] == "9000"
    assert [(p["name"], p["containerPort"]) for p in model["ports"]] == [("h2c", 9000)]
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/ready")):
        assert model[probe]["httpGet"] == {"path": path, "port": 8080}
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "dshm", "mountPath": "/dev/shm"} in model["volumeMounts"]
    # storageUri pvc://<claim>/<path>: the claim and folder the export Job writes.
    docs = load("models.yaml")
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{claim}/repository"
    export_pod = one(docs, "Job")["spec"]["template"]["spec"]
    (export,) = export_pod["containers"]
    mount = export["volumeMounts"][0]
    assert [v for v in export_pod["volumes"] if v["name"] == mount["name"]][0]["persistentVolumeClaim"]["claimName"] == claim
    out = export["args"][export["args"].index("--out") + 1]
    assert out == f"{mount['mountPath']}/repository"
    assert export["image"].startswith("triffusion-export:") and "command" not in export  # the image's entrypoint
    assert set(by_kind(docs)) == {"PersistentVolumeClaim", "Job"}


def test_the_crd_schema_catches_a_misspelt_field():
    import copy

    import pytest

    isvc = one(load("inferenceservice.yaml"), "InferenceService")
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["model"]["storageURI"] = wrong["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(AssertionError, match="storageURI"):
        validate(wrong)
