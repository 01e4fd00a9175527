"""Perf workloads as data: the prompt set, mix validation, request sampling, arrival processes and the
perf_analyzer file formats. Statistical checks use large samples and fixed seeds with tolerances of
several standard errors, so they are deterministic yet fail when a process has the wrong shape."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perf.perf_analyzer_slo import input_data as slo_input_data
from perf.workloads import (Mix, RequestClass, WorkloadError, gamma_arrivals, load_mix, load_prompts,
                            maf_arrivals, mix_names, perf_analyzer_input_data, poisson_arrivals,
                            read_request_intervals, sample_requests, write_request_intervals)
from triffusion import contract

REPO = Path(__file__).resolve().parents[2]
INPUT_NAMES = {spec.name for spec in contract.REQUEST_INPUTS}


def write_mix(tmp_path, classes, name="m"):
    path = tmp_path / "mixes.yaml"
    path.write_text(json.dumps({"mixes": {name: classes}}))  # JSON is YAML
    return path


GOOD = {"weight": 1, "height": 512, "width": 512, "steps": 50, "slo_ms": 5000, "priority": 1}


def dispersion(arrivals, duration, window):
    counts = np.histogram(arrivals, bins=np.arange(0.0, duration + window / 2, window))[0]
    return counts.var() / counts.mean()


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_set_is_large_unique_and_varied():
    prompts = load_prompts()
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)
    words = [len(p.split()) for p in prompts]
    assert min(words) <= 3 and max(words) >= 50
    assert any(not p.isascii() for p in prompts) and any('"' in p for p in prompts)


def test_every_prompt_fits_clip_context(tmp_path):
    """A prompt over 75 tokens is rejected by the orchestrator, and perf_analyzer stops on an error."""
    from triffusion.export.tokenizer import find_vocab, write_tokenizer

    try:
        find_vocab()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from triffusion.orchestrator.text import PromptTokenizer

    tokenizer = PromptTokenizer(write_tokenizer(tmp_path / "tokenizer"))
    too_long = [p for p in load_prompts() if tokenizer.count(p) > 75]
    assert not too_long


def test_prompt_file_errors_name_the_file(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(WorkloadError, match=r"blank\.txt: no prompts"):
        load_prompts(tmp_path / "blank.txt")
    with pytest.raises(WorkloadError, match=r"missing\.txt: cannot read prompts"):
        load_prompts(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------------ mixes


def test_shipped_mixes_load_with_the_promised_shape():
    assert {"tiny-smoke", "sd15-mixed", "sd15-interactive"} <= set(mix_names())
    for name in mix_names():
        assert load_mix(name).classes

    tiny = load_mix("tiny-smoke").classes
    assert {(c.height, c.width) for c in tiny} == {(64, 64), (128, 128)}
    assert all(2 <= c.steps <= 10 for c in tiny)

    mixed = load_mix("sd15-mixed").classes
    assert {c.height for c in mixed} == {512, 768} and {c.steps for c in mixed} == {50}
    assert {(c.slo_ms, c.priority) for c in mixed} == {(5000, 1), (20000, 0)}

    interactive = load_mix("sd15-interactive").classes
    assert {(c.height, c.width, c.steps, c.slo_ms) for c in interactive} == {(512, 512, 50, 3000)}


def test_optional_fields_take_their_defaults(tmp_path):
    (c,) = load_mix("m", write_mix(tmp_path, [GOOD])).classes
    assert (c.step_mode, c.min_steps, c.unet, c.guidance_scale) == ("fixed", 50, "default", 7.5)


@pytest.mark.parametrize("field, value, allowed", [
    ("height", 500, "allowed multiples of 8 in 64..2048"),
    ("width", 4096, "allowed multiples of 8 in 64..2048"),
    ("height", "512", "allowed multiples of 8 in 64..2048"),
    ("steps", 0, "allowed 1..1000"),
    ("steps", 1001, "allowed 1..1000"),
    ("slo_ms", 0, "allowed 1..3600000"),
    ("weight", 0, "allowed > 0"),
    ("weight", -2.5, "allowed > 0"),
    ("priority", 10, "allowed 0..9"),
    ("step_mode", "fast", "allowed: fixed, auto"),
    ("min_steps", 51, "allowed 1..50"),
    ("guidance_scale", 25, "allowed 0.0..20.0"),
    ("unet", "", "allowed: a non-empty string"),
])
def test_bad_field_names_the_field_and_the_allowed_range(tmp_path, field, value, allowed):
    path = write_mix(tmp_path, [GOOD, {**GOOD, field: value}])
    with pytest.raises(WorkloadError) as info:
        load_mix("m", path)
    message = str(info.value)
    assert message.startswith(f"mixes.m[1].{field}: ") and allowed in message
    assert "\n" not in message


def test_missing_and_unknown_fields_are_named(tmp_path):
    without_steps = {k: v for k, v in GOOD.items() if k != "steps"}
    with pytest.raises(WorkloadError, match=r"^mixes\.m\[0\]\.steps: is required$"):
        load_mix("m", write_mix(tmp_path, [without_steps]))
    with pytest.raises(WorkloadError, match=r"^mixes\.m\[0\]\.sampler: unknown field; allowed: weight, "):
        load_mix("m", write_mix(tmp_path, [{**GOOD, "sampler": "euler"}]))
    with pytest.raises(WorkloadError, match=r"^mixes\.m: expected a non-empty list"):
        load_mix("m", write_mix(tmp_path, []))


def test_unknown_mix_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown mix 'nope'; known: tiny-smoke, sd15-mixed, sd15-interactive"):
        load_mix("nope")


def test_malformed_mix_file_is_one_error(tmp_path):
    path = tmp_path / "mixes.yaml"
    path.write_text("just: [a, list\n")
    with pytest.raises(WorkloadError, match=r"mixes\.yaml: not valid YAML"):
        load_mix("m", path)
    path.write_text("other: 1\n")
    with pytest.raises(WorkloadError, match=r"expected a top-level 'mixes' mapping"):
        load_mix("m", path)


# --------------------------------------------------------------------------------------------- requests


def test_sampling_is_deterministic_for_a_seed():
    mix, prompts = load_mix("tiny-smoke"), load_prompts()
    assert sample_requests(mix, prompts, 50, seed=3) == sample_requests(mix, prompts, 50, seed=3)
    assert sample_requests(mix, prompts, 50, seed=3) != sample_requests(mix, prompts, 50, seed=4)


def test_sampled_requests_name_every_orchestrator_input_with_a_value():
    mix = load_mix("tiny-smoke")
    requests = sample_requests(mix, load_prompts(), 200, seed=0)
    classes = {(c.height, c.width, c.steps, c.slo_ms, c.priority, c.min_steps, c.step_mode) for c in mix.classes}
    for r in requests:
        assert set(r) == INPUT_NAMES and all(v is not None for v in r.values())
        assert (r["height"], r["width"], r["steps"], r["slo_ms"], r["priority"], r["min_steps"],
                r["step_mode"]) in classes
        assert (r["negative_prompt"], r["scheduler"], r["stream"], r["preview_every"], r["unet"],
                r["guidance_scale"]) == ("", "euler", False, 0, "default", 7.5)
    assert any(r["step_mode"] == "auto" and r["min_steps"] == 2 for r in requests)
    assert len({r["seed"] for r in requests}) > 190  # a per-request seed, not one shared
    json.dumps(requests)  # plain Python values, ready for perf_analyzer's JSON


def test_sampled_classes_follow_the_mix_weights():
    """Chi-square goodness of fit; 16.27 is the 0.1% critical value for 3 degrees of freedom."""
    mix = Mix("w", tuple(RequestClass(weight=w, height=64, width=64, steps=s, slo_ms=1000, priority=0,
                                      min_steps=s) for w, s in ((5, 1), (3, 2), (1.5, 3), (0.5, 4))))
    n = 40_000
    observed = np.bincount([r["steps"] for r in sample_requests(mix, ["p"], n, seed=11)], minlength=5)[1:]
    expected = n * np.array(mix.probabilities())
    assert ((observed - expected) ** 2 / expected).sum() < 16.27


def test_input_data_has_the_shape_perf_analyzer_slo_writes():
    prompts = ["a", "b"]
    mix = Mix("one", (RequestClass(weight=1, height=64, width=64, steps=3, slo_ms=1000, priority=0, min_steps=3),))
    requests = sample_requests(mix, prompts, 2, seed=0)
    for i, request in enumerate(requests):  # the old writer's prompt order and seeds
        request.update(prompt=prompts[i], seed=i)
    assert perf_analyzer_input_data(requests) == slo_input_data(prompts, size=64, steps=3, slo_ms=1000)


def test_input_data_rejects_a_request_missing_an_input():
    request = sample_requests(load_mix("tiny-smoke"), ["p"], 1, seed=0)[0]
    del request["unet"]
    with pytest.raises(WorkloadError, match=r"^requests\[0\]: missing unet; every orchestrator input is required"):
        perf_analyzer_input_data([request])


# --------------------------------------------------------------------------------------------- arrivals


@pytest.mark.parametrize("make", [
    lambda seed: poisson_arrivals(5, 100, seed),
    lambda seed: gamma_arrivals(5, 2.0, 100, seed),
    lambda seed: maf_arrivals(5, 100, seed),
])
def test_arrivals_are_sorted_in_range_and_deterministic(make):
    a = make(1)
    assert a == make(1) and a != make(2)
    assert a == sorted(a) and 0 <= a[0] and a[-1] < 100


def test_poisson_mean_rate_and_unit_cv():
    rate, duration = 50.0, 200.0  # ~10000 arrivals: count sd 1%
    a = poisson_arrivals(rate, duration, seed=0)
    assert abs(len(a) / duration - rate) / rate < 0.05
    gaps = np.diff(a)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_inter_arrivals_have_the_asked_cv_and_rate(cv):
    rate, duration = 20.0, 2000.0  # ~40000 gaps
    a = gamma_arrivals(rate, cv, duration, seed=5)
    assert abs(len(a) / duration - rate) / rate < 0.05
    gaps = np.diff(a)
    assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.10


def test_maf_is_bursty_at_the_asked_mean_rate():
    """Counts per window: a Poisson process has variance/mean ~1; the MAF-shaped trace far above."""
    rate, duration, window = 5.0, 36_000.0, 10.0
    maf = maf_arrivals(rate, duration, seed=2, window=window)
    poisson = poisson_arrivals(rate, duration, seed=2)
    assert abs(len(maf) / duration - rate) / rate < 0.03  # normalized: only Poisson noise is left
    assert 0.8 < dispersion(poisson, duration, window) < 1.2
    assert dispersion(maf, duration, window) > 10
    assert maf_arrivals(rate, 600, seed=2) == maf_arrivals(rate, 600, seed=2, window=10)  # default: 60 windows


@pytest.mark.parametrize("call, message", [
    (lambda: poisson_arrivals(0, 10, 0), r"^rate: 0 is not allowed; allowed a finite number > 0$"),
    (lambda: poisson_arrivals(1, -1, 0), r"^duration: -1 is not allowed"),
    (lambda: gamma_arrivals(1, 0, 10, 0), r"^cv: 0 is not allowed; allowed a finite number > 0$"),
    (lambda: maf_arrivals(1, 10, 0, rho=1.0), r"^rho: 1.0 is not allowed; allowed 0 <= rho < 1$"),
    (lambda: poisson_arrivals(1, 10, -1), r"^seed: -1 is not allowed; allowed integers >= 0$"),
    (lambda: poisson_arrivals(1e6, 1e6, 0), r"^rate \* duration: .* allowed at most"),
])
def test_bad_arrival_parameters_name_the_parameter(call, message):
    with pytest.raises(WorkloadError, match=message):
        call()


# ---------------------------------------------------------------------------------- request intervals


def test_request_intervals_round_trip_in_whole_microseconds(tmp_path):
    arrivals = poisson_arrivals(200, 60, seed=9)
    path = write_request_intervals(arrivals, tmp_path / "intervals.txt")
    lines = path.read_text().splitlines()
    assert len(lines) == len(arrivals) and all(line.isdigit() for line in lines)
    assert int(lines[0]) == round(arrivals[0] * 1e6)  # perf_analyzer waits the first gap too
    back = read_request_intervals(path)
    # Within half a microsecond everywhere: rounding never accumulates over the trace.
    assert np.abs(np.array(back) - np.array(arrivals)).max() <= 0.5e-6 + 1e-9


def test_request_intervals_exact_values(tmp_path):
    path = write_request_intervals([0.0000004, 0.25, 0.25, 1.0000016], tmp_path / "i.txt")
    assert path.read_text() == "0\n250000\n0\n750002\n"
    assert read_request_intervals(path) == [0.0, 0.25, 0.25, 1.000002]


def test_unsorted_or_empty_arrivals_are_refused(tmp_path):
    with pytest.raises(WorkloadError, match="arrivals: must be sorted"):
        write_request_intervals([1.0, 0.5], tmp_path / "i.txt")
    with pytest.raises(WorkloadError, match="arrivals: empty"):
        write_request_intervals([], tmp_path / "i.txt")


@pytest.mark.parametrize("text, where, problem", [
    ("", "", "empty; expected one non-negative integer per line"),
    ("100\nabc\n", ":2", "'abc' is not an integer"),
    ("100\n2.5\n", ":2", "'2.5' is not an integer"),
    ("100\n200\n-5\n", ":3", "-5 is negative"),
    ("100\n\n200\n", ":2", "'' is not an integer"),  # perf_analyzer's stol would throw on a blank line
    ("1_000\n", ":1", "'1_000' is not an integer"),
])
def test_malformed_interval_files_name_the_file_and_line(tmp_path, text, where, problem):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(WorkloadError) as info:
        read_request_intervals(path)
    message = str(info.value)
    assert message.startswith(f"{path}{where}: ") and problem in message and "\n" not in message


# -------------------------------------------------------------------------------------------------- CLI


def cli(*args):
    return subprocess.run([sys.executable, "-m", "perf.workloads", *args], cwd=REPO, capture_output=True,
                          text=True)


@pytest.mark.parametrize("args, message", [
    (["input-data", "--mix", "nope", "--n", "4", "--seed", "0", "--out", "x.json"],
     "error: unknown mix 'nope'; known: tiny-smoke, sd15-mixed, sd15-interactive"),
    (["trace", "--kind", "gamma", "--rate", "2", "--duration", "10", "--seed", "0", "--out", "x.txt"],
     "error: --cv is required with --kind gamma"),
    (["trace", "--kind", "weibull", "--rate", "2", "--duration", "10", "--seed", "0", "--out", "x.txt"],
     "error: argument --kind: invalid choice: 'weibull'"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, args, message):
    done = cli(*[str(tmp_path / a) if a.startswith("x.") else a for a in args])
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1 and not done.stdout
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_writes_a_trace_and_input_data(tmp_path):
    trace = cli("trace", "--kind", "maf", "--rate", "4", "--duration", "30", "--seed", "1",
                "--out", str(tmp_path / "intervals.txt"))
    assert trace.returncode == 0, trace.stderr
    assert read_request_intervals(tmp_path / "intervals.txt") == pytest.approx(maf_arrivals(4, 30, 1), abs=1e-6)

    data = cli("input-data", "--mix", "sd15-mixed", "--n", "16", "--seed", "2", "--out", str(tmp_path / "in.json"))
    assert data.returncode == 0, data.stderr
    written = json.loads((tmp_path / "in.json").read_text(encoding="utf-8"))
    expected = perf_analyzer_input_data(sample_requests(load_mix("sd15-mixed"), load_prompts(), 16, 2))
    assert written == expected
