"""`triffusion generate` without a server: every request field has an option and reaches the client,
previews are saved, Ctrl-C prints one line and exits 130."""

from __future__ import annotations

import json

import numpy as np
import pytest

import triffusion.client as client
from triffusion import cli, contract
from triffusion.client import GenerationResult

IMAGE = np.zeros((64, 64, 3), np.uint8)
META = {"seed": 5, "steps": 4, "steps_done": 4}
OPTIONS = ["--negative-prompt", "blurry", "--height", "64", "--width", "96", "--steps", "4", "--guidance-scale", "3.5",
           "--seed", "5", "--scheduler", "ddim", "--slo-ms", "60000", "--priority", "3", "--min-steps", "2",
           "--step-mode", "auto", "--unet", "tiny-lite", "--timeout", "12.5"]
EXPECTED = {"negative_prompt": "blurry", "height": 64, "width": 96, "steps": 4, "guidance_scale": 3.5, "seed": 5,
            "scheduler": "ddim", "slo_ms": 60000, "priority": 3, "min_steps": 2, "step_mode": "auto",
            "unet": "tiny-lite"}


def generate_options() -> dict[str, str]:
    """dest -> option string of the generate subcommand."""
    sub = next(a for a in cli.parser()._actions if a.dest == "command")
    return {a.dest: a.option_strings[-1] for a in sub.choices["generate"]._actions if a.option_strings}


def test_every_request_field_has_an_option():
    fields = ({spec.name for spec in contract.REQUEST_INPUTS + contract.CONTROL_INPUTS + contract.LORA_INPUTS}
              - {"prompt", "stream"})
    assert set(cli.GENERATE_FIELDS) == fields
    options = generate_options()
    assert fields <= set(options)
    assert options["timeout"] == "--timeout" and options["preview_every"] == "--preview-every"


class FakeHandle:
    def __init__(self, kwargs, interrupt=False):
        self.kwargs, self.interrupt = kwargs, interrupt

    def result(self, timeout=None):
        self.kwargs["result_timeout"] = timeout
        for step in range(1, 5):
            self.kwargs["on_progress"](step, 4)
            if self.interrupt and step == 2:
                raise KeyboardInterrupt
            if self.kwargs.get("preview_every") and step % self.kwargs["preview_every"] == 0 and step < 4:
                self.kwargs["on_preview"](np.full((8, 12, 3), step, np.uint8))
        return GenerationResult(IMAGE, dict(META))


@pytest.fixture
def calls(monkeypatch):
    """What the CLI asked of the client: ('stream' | 'unary', prompt, kwargs)."""
    seen = []

    def start_stream_generation(prompt, **kwargs):
        seen.append(("stream", prompt, kwargs))
        return FakeHandle(kwargs, interrupt=prompt == "interrupt")

    def generate(prompt, **kwargs):
        seen.append(("unary", prompt, kwargs))
        if prompt == "interrupt":
            raise KeyboardInterrupt
        return GenerationResult(IMAGE, dict(META))

    monkeypatch.setattr(client, "start_stream_generation", start_stream_generation)
    monkeypatch.setattr(client, "generate", generate)
    return seen


def test_grpc_streams_every_field_and_the_timeout(calls, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert cli.main(["generate", "a cat", *OPTIONS, "--url", "h:1", "-o", str(out)]) == 0
    (kind, prompt, kwargs), = calls
    assert (kind, prompt) == ("stream", "a cat")
    assert {k: kwargs[k] for k in EXPECTED} == EXPECTED and kwargs["preview_every"] is None
    assert (kwargs["url"], kwargs["timeout_s"], kwargs["result_timeout"]) == ("h:1", 12.5, 12.5)
    assert json.loads(capsys.readouterr().out) == {"output": str(out), **META}
    assert out.exists()


@pytest.mark.parametrize("argv, protocol", [(["--no-progress"], "grpc"), (["--protocol", "http"], "http")])
def test_unary_calls_pass_every_field(calls, tmp_path, argv, protocol):
    assert cli.main(["generate", "a cat", *OPTIONS, *argv, "-o", str(tmp_path / "x.png")]) == 0
    (kind, _, kwargs), = calls
    assert kind == "unary" and kwargs["protocol"] == protocol and kwargs["timeout_s"] == 12.5
    assert {k: kwargs[k] for k in EXPECTED} == EXPECTED


def test_previews_are_saved_next_to_the_output(calls, tmp_path, capsys):
    out = tmp_path / "cat.png"
    # --preview-every streams over gRPC even without a progress bar.
    assert cli.main(["generate", "a cat", "--preview-every", "2", "--no-progress", "-o", str(out)]) == 0
    assert calls[0][0] == "stream" and calls[0][2]["preview_every"] == 2
    printed = json.loads(capsys.readouterr().out)
    assert printed["previews"] == [str(tmp_path / "cat.preview-2.png")]
    assert (tmp_path / "cat.preview-2.png").exists() and not (tmp_path / "cat.preview-4.png").exists()


def test_preview_every_over_http_is_left_to_the_server(calls, tmp_path):
    """The unary front refuses it naming the field; the CLI does not second-guess the server."""
    assert cli.main(["generate", "a cat", "--preview-every", "2", "--protocol", "http", "-o",
                     str(tmp_path / "x.png")]) == 0
    assert calls[0][0] == "unary" and calls[0][2]["preview_every"] == 2


@pytest.mark.parametrize("argv", [[], ["--no-progress"], ["--protocol", "http"]])
def test_ctrl_c_prints_cancelled_and_exits_130(calls, tmp_path, capsys, argv):
    out = tmp_path / "x.png"
    assert cli.main(["generate", "interrupt", *argv, "-o", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines()[-1] == "cancelled"
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "inf"], ["--step-mode", "sometimes"],
                                  ["--priority", "high"]])
def test_argparse_refuses_what_its_types_can_tell(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "a cat", *argv])
    assert info.value.code == 2
