"""docker-compose.yml for GPU hosts: validated by a real compose implementation where one is installed
(CI installs Debian's docker-compose), and structurally everywhere."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def compose_command():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def check(config: dict) -> None:
    export, triton = config["services"]["export"], config["services"]["triton"]
    for service in (export, triton):
        assert service["image"].startswith("nvcr.io/nvidia/tritonserver:") and service["image"].endswith("-py3")
        device = service["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "triffusion.export build" in " ".join(export["command"]) and export["restart"] == "no"
    serve = " ".join(triton["command"])
    assert "triffusion serve --repo /models/repository --host 0.0.0.0" in serve and "--grace 30" in serve
    assert triton["environment"]["TRITONSERVER"] == "/opt/tritonserver/bin/tritonserver"
    assert triton["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert str(triton["shm_size"]) in ("2gb", "${SHM_SIZE:-2gb}")  # resolved by compose, raw in the file
    assert triton["ulimits"] == {"memlock": -1, "stack": 67108864}
    ports = {str(p["target"] if isinstance(p, dict) else p.split(":")[-1]) for p in triton["ports"]}
    assert ports == {"8000", "8001", "8002"}
    assert "http://localhost:8000/v2/health/ready" in triton["healthcheck"]["test"]
    assert {"models", "hf-cache"} <= set(config["volumes"])
    assert any(str(v).startswith("models:/models") for v in triton["volumes"])


def test_compose_file_structure():
    check(yaml.safe_load(COMPOSE.read_text()))


def test_real_compose_config_accepts_the_file(monkeypatch):
    command = compose_command()
    if command is None:
        pytest.skip("no compose implementation installed (docker-compose or the docker compose plugin)")
    monkeypatch.setenv("TRITON_VERSION", "26.04")
    done = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          cwd=COMPOSE.parent)
    assert done.returncode == 0, done.stderr
    check(yaml.safe_load(done.stdout))
