"""Regenerate the vendored CRD schemas in this folder (the tests validate the chart's and the examples'
custom resources against them; no cluster and no network is needed at test time).

Each file is the `openAPIV3Schema` of one served version of an upstream CustomResourceDefinition, with the
`description` texts dropped (they do not take part in validation) to keep the files small:

    python deploy/schemas/vendor.py PATH_TO_PROMETHEUS_OPERATOR_CHECKOUT PATH_TO_KSERVE_CHECKOUT

SOURCES below names the upstream file of each; SOURCE.md records the commits they were taken from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
# (output, checkout index, CRD path in the checkout, version)
SOURCES = [
    ("monitoring.coreos.com_v1_servicemonitor.json", 0,
     "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml", "v1"),
    ("monitoring.coreos.com_v1_podmonitor.json", 0,
     "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "v1"),
    ("serving.kserve.io_v1beta1_inferenceservice.json", 1,
     "config/crd/full/serving.kserve.io_inferenceservices.yaml", "v1beta1"),
]


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(checkouts: list[str]) -> None:
    for out, index, path, version in SOURCES:
        crd = yaml.safe_load((Path(checkouts[index]) / path).read_text())
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = strip_descriptions(served["schema"]["openAPIV3Schema"])
        document = {"group": crd["spec"]["group"], "version": version, "kind": crd["spec"]["names"]["kind"],
                    "source": path, "openAPIV3Schema": schema}
        (HERE / out).write_text(json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n")
        print(out, len((HERE / out).read_bytes()), "bytes")


if __name__ == "__main__":
    main(sys.argv[1:3])
