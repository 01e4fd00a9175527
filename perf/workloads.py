"""Perf workloads as data: prompts, named request mixes and arrival traces for perf_analyzer SLO runs.

A run is (mix, prompts, arrivals): `sample_requests` turns a mix into fully specified requests,
`perf_analyzer_input_data` into perf_analyzer's `--input-data` JSON, and an arrival process into its
`--request-intervals` file. Everything is deterministic for a seed so two systems see the same load.

    python -m perf.workloads trace --kind maf --rate 2 --duration 300 --seed 0 --out intervals.txt
    python -m perf.workloads input-data --mix sd15-mixed --n 256 --seed 0 --out input.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from perf.cli import OneLineParser
from triffusion import contract
from triffusion.orchestrator.params import STEP_MODES, Limits

WORKLOADS_DIR = Path(__file__).parent / "workloads"
PROMPTS_PATH = WORKLOADS_DIR / "prompts.txt"
MIXES_PATH = WORKLOADS_DIR / "mixes.yaml"

# Mix limits are workload sanity bounds, wider than any one export's Limits (a 64..512 tiny export and a
# 256..1024 SD export both draw from them); priority, SLO and guidance bounds are the orchestrator's own.
SIZE_MULTIPLE, MIN_SIZE, MAX_SIZE = 8, 64, 2048
MIN_STEPS, MAX_STEPS = 1, 1000
_LIMITS = Limits()
MAX_EXPECTED_ARRIVALS = 10_000_000  # guards a typo'd rate or duration from filling memory

# What sample_requests fills in for fields a mix class does not set.
DEFAULT_NEGATIVE_PROMPT = ""
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_SCHEDULER = "euler"
DEFAULT_UNET = "default"


class WorkloadError(ValueError):
    """A workload file or parameter is malformed; the message names the place and what is allowed."""


# ---------------------------------------------------------------------------------------------- prompts


def load_prompts(path: str | Path = PROMPTS_PATH) -> list[str]:
    """Prompts, one per line; blank lines are skipped so the file may end with a newline."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read prompts ({exc.strerror or exc})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise WorkloadError(f"{path}: no prompts; expected one prompt per line")
    return prompts


# ------------------------------------------------------------------------------------------------ mixes


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in a mix, drawn with probability weight / (sum of the mix's weights)."""

    weight: float
    height: int
    width: int
    steps: int
    slo_ms: int
    priority: int
    min_steps: int  # equals steps unless the class lets the server serve fewer
    step_mode: str = "fixed"
    unet: str = DEFAULT_UNET
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE


@dataclass(frozen=True)
class Mix:
    name: str
    classes: tuple[RequestClass, ...]

    def probabilities(self) -> list[float]:
        total = sum(c.weight for c in self.classes)
        return [c.weight / total for c in self.classes]


REQUIRED_FIELDS = ("weight", "height", "width", "steps", "slo_ms", "priority")
OPTIONAL_FIELDS = ("step_mode", "min_steps", "unet", "guidance_scale")


def _read_mixes(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read mixes ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise WorkloadError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("mixes"), dict) or not data["mixes"]:
        raise WorkloadError(f"{path}: expected a top-level 'mixes' mapping of name -> list of classes")
    return data["mixes"]


def mix_names(path: str | Path = MIXES_PATH) -> list[str]:
    return list(_read_mixes(Path(path)))


def _integer(where: str, value, low: int, high: int, multiple: int = 1) -> int:
    allowed = f"multiples of {multiple} in {low}..{high}" if multiple > 1 else f"{low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkloadError(f"{where}: {value!r} is not an integer; allowed {allowed}")
    if not low <= value <= high or value % multiple:
        raise WorkloadError(f"{where}: {value} is out of range; allowed {allowed}")
    return value


def _number(where: str, value, low: float, high: float, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkloadError(f"{where}: {value!r} is not a finite number; allowed {allowed}")
    if not low <= value <= high:
        raise WorkloadError(f"{where}: {value} is out of range; allowed {allowed}")
    return float(value)


def _request_class(where: str, raw) -> RequestClass:
    """Check one class of a mix; every error names `mixes.<name>[i].<field>` and the allowed values."""
    if not isinstance(raw, dict):
        raise WorkloadError(f"{where}: expected a mapping of request fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise WorkloadError(f"{where}.{unknown[0]}: unknown field; allowed: "
                            + ", ".join(REQUIRED_FIELDS + OPTIONAL_FIELDS))
    for name in REQUIRED_FIELDS:
        if name not in raw:
            raise WorkloadError(f"{where}.{name}: is required")

    weight = _number(f"{where}.weight", raw["weight"], 0.0, math.inf, "> 0")
    if weight == 0:
        raise WorkloadError(f"{where}.weight: 0 is out of range; allowed > 0")
    height, width = (_integer(f"{where}.{name}", raw[name], MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE)
                     for name in ("height", "width"))
    steps = _integer(f"{where}.steps", raw["steps"], MIN_STEPS, MAX_STEPS)
    slo_ms = _integer(f"{where}.slo_ms", raw["slo_ms"], 1, _LIMITS.max_slo_ms)
    priority = _integer(f"{where}.priority", raw["priority"], 0, _LIMITS.max_priority)
    min_steps = _integer(f"{where}.min_steps", raw.get("min_steps", steps), MIN_STEPS, steps)
    step_mode = raw.get("step_mode", "fixed")
    if step_mode not in STEP_MODES:
        raise WorkloadError(f"{where}.step_mode: {step_mode!r} is unknown; allowed: {', '.join(STEP_MODES)}")
    unet = raw.get("unet", DEFAULT_UNET)
    if not isinstance(unet, str) or not unet.strip():
        raise WorkloadError(f"{where}.unet: {unet!r} is not a UNet variant name; allowed: a non-empty string "
                            f"such as '{DEFAULT_UNET}'")
    guidance = _number(f"{where}.guidance_scale", raw.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
                       _LIMITS.min_guidance, _LIMITS.max_guidance,
                       f"{_LIMITS.min_guidance}..{_LIMITS.max_guidance}")
    return RequestClass(weight=weight, height=height, width=width, steps=steps, slo_ms=slo_ms,
                        priority=priority, min_steps=min_steps, step_mode=step_mode, unet=unet,
                        guidance_scale=guidance)


def load_mix(name: str, path: str | Path = MIXES_PATH) -> Mix:
    """The named mix from `path`, every class checked."""
    mixes = _read_mixes(Path(path))
    if name not in mixes:
        raise WorkloadError(f"unknown mix '{name}'; known: {', '.join(mixes)}")
    classes = mixes[name]
    if not isinstance(classes, list) or not classes:
        raise WorkloadError(f"mixes.{name}: expected a non-empty list of request classes")
    return Mix(name, tuple(_request_class(f"mixes.{name}[{i}]", raw) for i, raw in enumerate(classes)))


# --------------------------------------------------------------------------------------------- requests


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise WorkloadError(f"seed: {seed!r} is not allowed; allowed integers >= 0")
    return seed


def sample_requests(mix: Mix, prompts: list[str], n: int, seed: int) -> list[dict]:
    """`n` requests drawn from `mix`, each naming every orchestrator input with a value.

    Every input is explicit because perf_analyzer fills unnamed optional inputs with random data."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise WorkloadError(f"n: {n!r} is not allowed; allowed integers >= 0")
    if not prompts:
        raise WorkloadError("prompts: empty; allowed a list of at least one prompt")
    rng = np.random.default_rng(_check_seed(seed))
    picks = rng.choice(len(mix.classes), size=n, p=mix.probabilities())
    prompt_ids = rng.integers(len(prompts), size=n)
    seeds = rng.integers(2**31, size=n)  # within any export's max_seed
    requests = []
    for k, p, s in zip(picks, prompt_ids, seeds):
        c = mix.classes[int(k)]
        requests.append({"prompt": prompts[int(p)], "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
                         "height": c.height, "width": c.width, "steps": c.steps,
                         "guidance_scale": c.guidance_scale, "seed": int(s), "scheduler": DEFAULT_SCHEDULER,
                         "stream": False, "slo_ms": c.slo_ms, "slo_class": "", "priority": c.priority,
                         "min_steps": c.min_steps, "step_mode": c.step_mode, "preview_every": 0,
                         "unet": c.unet})
    return requests


def perf_analyzer_input_data(requests: list[dict]) -> dict:
    """perf_analyzer `--input-data` JSON, `{"data": [{input: [value], ...}, ...]}`, one entry per request
    (the shape perf_analyzer_slo.input_data writes); a request that misses or adds an input is an error."""
    names = [spec.name for spec in contract.REQUEST_INPUTS]
    rows = []
    for i, request in enumerate(requests):
        missing = [name for name in names if request.get(name) is None]
        extra = sorted(set(request) - set(names))
        if missing or extra:
            problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"
            raise WorkloadError(f"requests[{i}]: {problem}; every orchestrator input is required: "
                                + ", ".join(names))
        rows.append({name: [request[name]] for name in names})
    if not rows:
        raise WorkloadError("requests: empty; perf_analyzer needs at least one request")
    return {"data": rows}


# --------------------------------------------------------------------------------------------- arrivals


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise WorkloadError(f"{name}: {value!r} is not allowed; allowed a finite number > 0")
    return float(value)


def _check_load(rate, duration) -> tuple[float, float]:
    rate, duration = _positive("rate", rate), _positive("duration", duration)
    if rate * duration > MAX_EXPECTED_ARRIVALS:
        raise WorkloadError(f"rate * duration: {rate * duration:g} expected arrivals; allowed at most "
                            f"{MAX_EXPECTED_ARRIVALS}")
    return rate, duration


def _renewal(draw, rate: float, duration: float) -> list[float]:
    """Arrival times in [0, duration) from i.i.d. inter-arrival gaps; `draw(k)` returns k gaps."""
    times, t = [], 0.0
    chunk = int(rate * duration * 1.2) + 16
    while t < duration:
        gaps = np.cumsum(draw(chunk)) + t
        times.append(gaps[gaps < duration])
        t = float(gaps[-1])
    return np.concatenate(times).tolist()


def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Sorted arrival times (s) of a Poisson process at `rate` per second over [0, duration)."""
    rate, duration = _check_load(rate, duration)
    rng = np.random.default_rng(_check_seed(seed))
    return _renewal(lambda k: rng.exponential(1.0 / rate, k), rate, duration)


def gamma_arrivals(rate: float, cv: float, duration: float, seed: int) -> list[float]:
    """Sorted arrival times (s) with Gamma inter-arrivals of mean 1/rate and coefficient of variation `cv`.

    cv = 1 is Poisson, cv > 1 bursty (clumps and long gaps), cv < 1 smoother than Poisson; the Gamma
    renewal process is the usual one-knob burstiness model in serving papers (shape 1/cv^2)."""
    rate, duration = _check_load(rate, duration)
    cv = _positive("cv", cv)
    shape = 1.0 / cv**2
    rng = np.random.default_rng(_check_seed(seed))
    return _renewal(lambda k: rng.gamma(shape, 1.0 / (rate * shape), k), rate, duration)


def maf_arrivals(rate: float, duration: float, seed: int, *, window: float | None = None, sigma: float = 1.0,
                 rho: float = 0.7, diurnal: float = 0.3) -> list[float]:
    """Sorted arrival times (s) of a SYNTHETIC trace shaped like the Microsoft Azure Functions (MAF)
    invocation traces that serving papers (DiffServe and other QoS work) replay; not the real dataset.

    MAF publishes per-minute invocation counts whose rate swings slowly and has a heavy right tail. This
    generator reproduces that shape: the trace is cut into windows (default duration/60, i.e. an hour of
    per-minute counts compressed into `duration`); each window's rate is lognormal, exp(sigma * z) with z
    an AR(1) series of lag-one correlation `rho` (bursts last several windows), times one slow
    sinusoidal swing of relative amplitude `diurnal` over the trace. The window rates are then scaled so
    their time average is exactly `rate` (the offered load is what was asked for), and arrivals within
    a window are Poisson. Counts per window are therefore over-dispersed (variance/mean >> 1, Poisson 1)."""
    rate, duration = _check_load(rate, duration)
    window = duration / 60 if window is None else _positive("window", window)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= 3:
        raise WorkloadError(f"sigma: {sigma!r} is not allowed; allowed 0..3")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
        raise WorkloadError(f"rho: {rho!r} is not allowed; allowed 0 <= rho < 1")
    if isinstance(diurnal, bool) or not isinstance(diurnal, (int, float)) or not 0 <= diurnal < 1:
        raise WorkloadError(f"diurnal: {diurnal!r} is not allowed; allowed 0 <= diurnal < 1")
    rng = np.random.default_rng(_check_seed(seed))

    # 1. Window edges; the last window may be shorter.
    edges = np.append(np.arange(0.0, duration, window), duration)
    starts, lengths = edges[:-1], np.diff(edges)
    # 2. Correlated heavy-tailed modulation with a slow swing, normalized to the asked-for mean rate.
    z = np.empty(len(starts))
    z[0] = rng.standard_normal()
    for i in range(1, len(z)):
        z[i] = rho * z[i - 1] + math.sqrt(1 - rho**2) * rng.standard_normal()
    swing = 1.0 + diurnal * np.sin(2 * np.pi * (starts + lengths / 2) / duration - np.pi / 2)
    level = np.exp(sigma * z) * swing
    rates = rate * level * duration / float(np.sum(level * lengths))
    # 3. Poisson arrivals inside each window.
    counts = rng.poisson(rates * lengths)
    times = np.repeat(starts, counts) + rng.random(int(counts.sum())) * np.repeat(lengths, counts)
    return np.sort(times).tolist()


# ---------------------------------------------------------------------------------- request intervals

INTERVALS_FORMAT = "one non-negative integer per line (microseconds between requests)"


def write_request_intervals(arrivals: list[float], path: str | Path) -> Path:
    """Write perf_analyzer's `--request-intervals` file: gap before each request in whole microseconds.

    perf_analyzer sends request i at the sum of the first i+1 gaps and loops over the file, so the first
    gap is the first arrival time. Times are rounded to the microsecond before differencing so rounding
    does not drift over a long trace."""
    if len(arrivals) == 0:
        raise WorkloadError("arrivals: empty; perf_analyzer needs at least one interval")
    micros = np.rint(np.asarray(arrivals, dtype=np.float64) * 1e6).astype(np.int64)
    gaps = np.diff(micros, prepend=0)
    if micros[0] < 0 or (gaps < 0).any():
        raise WorkloadError("arrivals: must be sorted and >= 0 seconds")
    path = Path(path)
    path.write_text("".join(f"{g}\n" for g in gaps.tolist()))
    return path


def read_request_intervals(path: str | Path) -> list[float]:
    """Arrival times (s) from a `--request-intervals` file, checked line by line as perf_analyzer reads it
    (it would crash on a bad line rather than say which)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: cannot read request intervals ({getattr(exc, 'strerror', None) or exc})") \
            from None
    if not lines:
        raise WorkloadError(f"{path}: empty; expected {INTERVALS_FORMAT}")
    total, times = 0, []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise WorkloadError(f"{path}:{number}: {text[:40]!r} is not an integer; expected {INTERVALS_FORMAT}")
        gap = int(text)
        if gap < 0:
            raise WorkloadError(f"{path}:{number}: {gap} is negative; expected {INTERVALS_FORMAT}")
        total += gap
        times.append(total / 1e6)
    return times


# -------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m perf.workloads", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    trace = sub.add_parser("trace", help="write a --request-intervals file")
    trace.add_argument("--kind", required=True, choices=("poisson", "gamma", "maf"))
    trace.add_argument("--rate", type=float, required=True, help="mean requests per second")
    trace.add_argument("--cv", type=float, help="gamma only: coefficient of variation of inter-arrivals")
    trace.add_argument("--window", type=float, help="maf only: seconds per rate window (default duration/60)")
    trace.add_argument("--duration", type=float, required=True, help="seconds")
    trace.add_argument("--seed", type=int, required=True)
    trace.add_argument("--out", required=True)
    data = sub.add_parser("input-data", help="write a perf_analyzer --input-data JSON file")
    data.add_argument("--mix", required=True)
    data.add_argument("--n", type=int, required=True, help="requests (perf_analyzer cycles through them)")
    data.add_argument("--seed", type=int, required=True)
    data.add_argument("--out", required=True)
    data.add_argument("--prompts", default=str(PROMPTS_PATH))
    data.add_argument("--mixes", default=str(MIXES_PATH))
    return ap


def _trace(args) -> str:
    if args.kind == "gamma" and args.cv is None:
        raise WorkloadError("--cv is required with --kind gamma")
    if args.kind != "gamma" and args.cv is not None:
        raise WorkloadError(f"--cv applies only to --kind gamma, not {args.kind}")
    if args.kind != "maf" and args.window is not None:
        raise WorkloadError(f"--window applies only to --kind maf, not {args.kind}")
    if args.kind == "poisson":
        arrivals = poisson_arrivals(args.rate, args.duration, args.seed)
    elif args.kind == "gamma":
        arrivals = gamma_arrivals(args.rate, args.cv, args.duration, args.seed)
    else:
        arrivals = maf_arrivals(args.rate, args.duration, args.seed, window=args.window)
    write_request_intervals(arrivals, args.out)
    return f"wrote {len(arrivals)} intervals ({len(arrivals) / args.duration:.3f}/s) to {args.out}"


def _input_data(args) -> str:
    requests = sample_requests(load_mix(args.mix, args.mixes), load_prompts(args.prompts), args.n, args.seed)
    Path(args.out).write_text(json.dumps(perf_analyzer_input_data(requests), ensure_ascii=False) + "\n",
                              encoding="utf-8")
    return f"wrote {len(requests)} requests of mix {args.mix} to {args.out}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(_trace(args) if args.command == "trace" else _input_data(args))
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.out}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
