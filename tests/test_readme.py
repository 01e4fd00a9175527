"""The README's commands run as written: every module and script it names answers --help, the first
generate command and the Python example run against a real server, and the export commands that need
no hub or GPU work (the ones that do fail in one line saying what to pass instead)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def invocations() -> list[list[str]]:
    """`python -m MODULE ...` and `python perf/SCRIPT.py ...` as the README writes them (code and tables)."""
    found = set()
    for match in re.finditer(r"(?:\.venv/bin/)?python3? (-m [\w.]+|perf/[\w]+\.py)", README):
        found.add(match.group(1))
    return sorted(shlex.split(f) for f in found)


def test_readme_names_the_commands_it_documents():
    modules = {" ".join(i) for i in invocations()}
    assert {"-m triffusion.export", "-m perf.soak", "-m perf.slo_bench", "-m perf.simulator"} <= modules


@pytest.mark.parametrize("command", invocations(), ids=lambda c: " ".join(c))
def test_every_documented_entry_point_answers_help(command):
    if command[:2] == ["-m", "triffusion.export"]:
        command = command + ["build"]
    if command[:2] == ["-m", "triffusion.orchestrator.gate"]:
        command = command + ["train"]
    if command[:2] == ["-m", "perf.workloads"]:
        command = command + ["trace"]
    done = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()


def code_block_after(marker: str) -> str:
    start = README.index(marker)
    block = re.search(r"```(?:python|bash)\n(.*?)```", README[start:], re.S)
    return block.group(1)


@pytest.mark.server
def test_first_generate_command_runs_as_written(server, tmp_path):
    command = code_block_after("Then, in a second shell, generate an image:").strip()
    assert command.startswith(".venv/bin/triffusion generate")
    argv = shlex.split(command)[1:] + ["--url", server.grpc]  # the test server's port, not 8001
    done = subprocess.run([sys.executable, "-m", "triffusion.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.png").stat().st_size > 0


@pytest.mark.server
def test_python_example_runs_as_written(server, tmp_path, monkeypatch):
    code = code_block_after("From Python:")
    assert 'url="localhost:8001"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("localhost:8001", server.grpc), "README", "exec"), {})
    assert (tmp_path / "out.png").stat().st_size > 0


def test_export_from_a_hub_preset_without_the_hub_fails_in_one_line(tmp_path):
    command = next(line for line in README.splitlines() if "--preset sd15 --out build/sd15" in line)
    argv = shlex.split(command.split("#")[0])[1:]
    argv[argv.index("build/sd15")] = str(tmp_path / "sd15")
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    # Libraries may warn before it; the CLI's own answer is one line, the last.
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and done.stderr.strip().endswith(lines[0]), done.stderr[-1500:]
    assert "pass --model PATH" in lines[0] and "--random-weights" in lines[0]
