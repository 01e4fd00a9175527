"""docker-compose.yml and the Dockerfile it builds, for GPU hosts: the compose file validated by a real
compose implementation where one is installed (CI installs Debian's docker-compose) and structurally
everywhere; the Dockerfile parsed by BuildKit's own parser (the `dockerfile` package) and checked against
the compose file that builds it."""

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
RELEASE = "26.04"


def compose_command():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def stages() -> tuple[dict[str, str], dict[str, list]]:
    """(global ARG defaults, stage name -> its instructions) of the Dockerfile."""
    args, found, current = {}, {}, None
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            assert len(command.value) == 3 and command.value[1].upper() == "AS", command.original
            current = found.setdefault(command.value[2], [])
            current.append(command)
        elif current is None:
            assert command.cmd == "ARG", f"only ARG may precede the first FROM: {command.original}"
            name, _, default = command.value[0].partition("=")
            args[name] = default
        else:
            current.append(command)
    return args, found


def instruction(stage: list, cmd: str) -> list:
    return [c for c in stage if c.cmd == cmd]


def seconds(duration: str) -> float:
    """A compose duration ('600s', '10m', '1h30m') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_dockerfile_builds_an_export_and_a_serve_image_of_one_release():
    args, found = stages()
    assert set(found) == {"export", "serve"} and args == {"TRITON_VERSION": RELEASE}
    assert found["export"][0].value[0] == "nvcr.io/nvidia/tensorrt:${TRITON_VERSION}-py3"
    assert found["serve"][0].value[0] == "nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3"
    for name, stage in found.items():
        assert [c.value for c in instruction(stage, "COPY")][-1] == (".", "."), name
        runs = " ".join(c.value[0] for c in instruction(stage, "RUN"))
        assert "pip install --no-deps -e ." in runs, name  # the project, at build time
        assert "tomllib" in runs and "['project']['dependencies']" in runs, name  # its dependencies, own layer
        assert instruction(stage, "ENTRYPOINT")[0].json, name  # exec form: signals reach the process
    env = {}
    for command in instruction(found["serve"], "ENV"):  # (name, value, name, value, ...)
        env.update(zip(command.value[::2], command.value[1::2]))
    assert env["TRITONSERVER"] == "/opt/tritonserver/bin/tritonserver"  # the image's server, not the wheel's
    assert instruction(found["serve"], "ENTRYPOINT")[0].value == ("triffusion", "serve")
    assert "clip-anytorch" in " ".join(c.value[0] for c in instruction(found["export"], "RUN"))  # CLIP's vocabulary


def test_dockerignore_keeps_what_the_install_needs_and_drops_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    ignored = lambda path: any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns)
    for needed in ("pyproject.toml", "model_repository/component/1/model.py", "export/configs/sd15/unet.json",
                   "triffusion/server.py", "orchestrator/engine.py", "client/api.py", "registry.example.yaml"):
        assert not ignored(needed), needed
    for dropped in (".git", ".venv", ".gpu-bundle", "build", "perf/results"):
        assert ignored(dropped), dropped


def check(config: dict) -> None:
    export, triton = config["services"]["export"], config["services"]["triton"]
    _, found = stages()
    for service, target in ((export, "export"), (triton, "serve")):
        assert service["build"]["target"] == target and service["build"]["args"]["TRITON_VERSION"] in (
            RELEASE, "${TRITON_VERSION:-26.04}")
        device = service["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "triffusion.export build" in " ".join(export["command"]) and export["restart"] == "no"
    assert "--out /models/repository" in " ".join(export["command"])
    assert "--target ngc" in export["environment"]["EXPORT_ARGS"]  # engines from the release's TensorRT
    # What the serving container runs: the image's entrypoint with the compose command.
    argv = " ".join(triton.get("entrypoint") or instruction(found["serve"], "ENTRYPOINT")[0].value) + " " + \
        " ".join(triton["command"])
    assert tuple(triton["command"]) == instruction(found["serve"], "CMD")[0].value  # the image alone serves the same
    assert "triffusion serve --repo /models/repository --host 0.0.0.0" in argv and "--grace 30" in argv
    assert all("/workspace" not in str(v) for v in triton["volumes"])  # the installed project, not a mount
    assert triton["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert str(triton["shm_size"]) in ("2gb", "${SHM_SIZE:-2gb}")  # resolved by compose, raw in the file
    assert triton["ulimits"] == {"memlock": -1, "stack": 67108864}
    ports = {str(p["target"] if isinstance(p, dict) else p.split(":")[-1]) for p in triton["ports"]}
    assert ports == {"8000", "8001", "8002"}
    health = triton["healthcheck"]
    assert "http://localhost:8000/v2/health/ready" in health["test"]
    assert seconds(health["start_period"]) >= 300  # weights, engines or CUDA graph capture at load
    assert {"models", "hf-cache"} <= set(config["volumes"])
    assert any(str(v).startswith("models:/models") for v in triton["volumes"])


def bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path (resolved against the compose file's folder) of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def check_monitoring(config: dict) -> None:
    """The `monitoring` profile: Prometheus scraping the triton service, Grafana provisioned from
    deploy/monitoring; `docker compose up` without the profile starts neither."""
    services = config["services"]
    assert not services["export"].get("profiles") and not services["triton"].get("profiles")
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == ["monitoring"] and grafana["profiles"] == ["monitoring"]
    for service in (prometheus, grafana):  # dashboards stay on the host unless an operator opens them
        assert all(str(p["host_ip"] if isinstance(p, dict) else p).startswith("127.0.0.1") for p in service["ports"])
    mounts = bind_mounts(prometheus)
    scrape = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["triton:8002"]  # the triton service's metrics port
    assert "--metrics-port" in services["triton"]["command"] and "8002" in services["triton"]["command"]
    mounts = bind_mounts(grafana)
    provisioning, dashboards = mounts["/etc/grafana/provisioning"], mounts["/var/lib/grafana/dashboards"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "triffusion.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    boards = sorted(dashboards.glob("*.json"))
    assert [b.name for b in boards] == ["triffusion.json"]
    assert str(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).endswith("/triffusion.json")
    import json

    board = json.loads(boards[0].read_text())  # every panel queries the provisioned datasource
    uids = {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


def test_compose_file_structure():
    config = yaml.safe_load(COMPOSE.read_text())
    check(config)
    check_monitoring(config)


def test_real_compose_config_accepts_the_file(monkeypatch):
    command = compose_command()
    if command is None:
        pytest.skip("no compose implementation installed (docker-compose or the docker compose plugin)")
    monkeypatch.setenv("TRITON_VERSION", RELEASE)
    done = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          cwd=COMPOSE.parent)
    assert done.returncode == 0, done.stderr
    check(yaml.safe_load(done.stdout))
    check_monitoring(yaml.safe_load(done.stdout))
