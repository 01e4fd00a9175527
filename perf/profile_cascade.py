"""Profile a cascade's operating points on a built repository, for the load-adaptive controller.

    python -m perf.profile_cascade --repo build/model_repository --steps 10,20 \
        --thresholds 0.3,0.4,0.5,0.6,0.7 --n 64 --out options.json [--write]

It serves the repository (triffusion.server.TritonServer: supervised, free ports, stopped at the end),
sends --n prompts (perf/workloads/prompts.txt, or --prompts; prompt i gets seed --seed + i) through the
`text_to_image` front over unary gRPC, once on the cascade's light UNet and once on its heavy one
(pipeline.json `cascade` names their Triton models; the request names are the `unets` entries that map
to them, normally the light preset and `default`), at each step count, and scores every image with the
repository's own gate (the `quality_gate` Triton model over gRPC: image and prompt, as the orchestrator
scores a light answer). For each (threshold, steps):

With --escalate F,F,... instead of --thresholds, each step count gets the thresholds under which those
fractions of its profiled light answers score (DiffServe picks its threshold by the fraction of queries
to escalate): the options then spread over escalations whatever the gate's score scale.

    escalation  fraction of light answers whose score is below the threshold (the router escalates
                score < threshold), so it never falls as the threshold rises
    quality     mean gate score of the answers the cascade returns: the light image where kept, the
                heavy image (same prompt, same seed) where escalated
    light_s     GPU-seconds per request on the light model: text encoding + steps UNet steps + VAE decode
    heavy_s     GPU-seconds per escalated request on the heavy model: steps UNet steps + VAE decode (an
                escalated request keeps its text embeddings; it is not encoded again)

GPU-seconds (--latency): `profile` (the default) evaluates the orchestrator's own latency model, the
LatencyPredictor seeded with the repository's orchestrator/1/profile.json (measured at export, the same
numbers admission control predicts with), for one request alone at the profiled size: batch 1, 2 UNet
rows with classifier-free guidance (guidance_scale > 1, the server's default), 1 without. That makes the
whole output a function of the repository and --seed: the same run writes the same file. `measured`
takes the median per-request server time instead, from the responses' metadata (timings_ms: encode +
denoise + decode for the light model, denoise + decode for the heavy one), each request sent alone
(batch 1) after one unrecorded warm-up per model; it follows the host, and varies a little run to run.
Both leave the gate's own time out (it scores a batch of light images per iteration), and both are batch
1: a loaded server batches, so the controller's `utilization` is the headroom. The profile is as good as
the export's measurement (best of 2 calls per shape): on a busy host one shape can come out slow, and
the command warns when the light model then costs more per request than the heavy one.

Output: the options list as JSON in the registry's `cascade.options` format (threshold, steps, escalation,
quality, light_s, heavy_s), checked with the registry's own validation; with --write also into the
repository's orchestrator/1/pipeline.json (`cascade.options`, read by the orchestrator at its next load)
and into export_manifest.json's copy of the pipeline, so that an up-to-date re-run of the export, which
rewrites pipeline.json from the manifest, keeps them. The controller only runs when the orchestrator's
`cascade_threshold` parameter is unset and `cascade_routing` is on; the command warns otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from perf.cli import OneLineParser, write_json
from perf.workloads import PROMPTS_PATH, WorkloadError, load_prompts
from triffusion import contract

PIPELINE_JSON = Path(contract.ORCHESTRATOR) / "1" / "pipeline.json"
PROFILE_JSON = Path(contract.ORCHESTRATOR) / "1" / "profile.json"
MANIFEST_JSON = Path("export_manifest.json")
SCORE_BATCH = 16  # images per quality_gate call (fixed, so that a run scores in the same groups every time)


class ProfileError(RuntimeError):
    """The profile cannot be taken; the message names what is missing and how to supply it."""


# ------------------------------------------------------------------------------------------ the repository


def read_pipeline(repo: Path) -> dict:
    path = repo / PIPELINE_JSON
    try:
        pipeline = json.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read ({exc.strerror or exc}); is {repo} a built model repository? "
                           "(python -m triffusion.export build ... --unet-variant LIGHT --cascade LIGHT)") from None
    if not pipeline.get("cascade"):
        raise ProfileError(f"{repo} serves no cascade; export it with --unet-variant LIGHT --cascade LIGHT")
    return pipeline


def request_names(pipeline: dict) -> tuple[str, str]:
    """The `unet` request values that run the cascade's light and heavy Triton models."""
    cascade = pipeline["cascade"]
    served = pipeline.get("limits", {}).get("unets") or list(pipeline.get("unets", {}))
    unets = pipeline.get("unets", {"default": contract.UNET})

    def name_of(model: str, role: str) -> str:
        names = [name for name, target in unets.items() if target == model and name in served]
        if not names:
            raise ProfileError(f"pipeline.json: no served unet variant runs the cascade's {role} model '{model}' "
                               f"(unets: {json.dumps(unets)})")
        return "default" if "default" in names else names[0]

    return name_of(cascade["light"], "light"), name_of(cascade["heavy"], "heavy")


def controller_blocked(repo: Path) -> str | None:
    """Why the orchestrator's config keeps the controller from using the options, if it does: a fixed
    cascade_threshold parameter, or cascade_routing off (the heavy model answers unet=cascade)."""
    config = repo / contract.ORCHESTRATOR / "config.pbtxt"
    text = config.read_text() if config.exists() else ""

    def parameter(key: str) -> str | None:
        match = re.search(rf'key:\s*"{key}"\s*value\s*{{\s*string_value:\s*"([^"]*)"', text)
        return match.group(1) if match and match.group(1) not in ("", "None", "none") else None

    if parameter("cascade_threshold") is not None:
        return f"its cascade_threshold parameter fixes the threshold at {parameter('cascade_threshold')}"
    if parameter("cascade_routing") == "off":
        return "its cascade_routing parameter is off"
    return None


# ------------------------------------------------------------------------------------------ the numbers


def operating_points(light: dict[int, np.ndarray], heavy: dict[int, np.ndarray], thresholds: Sequence[float],
                     light_s: dict[int, float], heavy_s: dict[int, float]) -> list[dict]:
    """Options per (threshold, steps) from gate scores of the light and heavy answers to the same queries
    (light[steps][i] and heavy[steps][i]: query i) and the seconds per request at each step count."""
    options = []
    for steps in sorted(light):
        kept_score, redo_score = np.asarray(light[steps], np.float64), np.asarray(heavy[steps], np.float64)
        if kept_score.shape != redo_score.shape or not kept_score.size:
            raise ProfileError(f"steps {steps}: {kept_score.size} light and {redo_score.size} heavy scores")
        for threshold in sorted(thresholds):
            escalated = kept_score < threshold  # the router: score >= threshold keeps the light answer
            answered = np.where(escalated, redo_score, kept_score)
            options.append({"threshold": float(threshold), "steps": int(steps),
                            "escalation": round(float(escalated.mean()), 6),
                            "quality": round(float(max(answered.mean(), 0.0)), 6),
                            "light_s": _sig(light_s[steps]), "heavy_s": _sig(heavy_s[steps])})
    return options


def escalation_thresholds(scores, fractions: Sequence[float]) -> list[float]:
    """Thresholds escalating each fraction of these light-answer scores (orchestrator.gate.calibrate_threshold),
    clipped to the registry's 0..1."""
    from triffusion.orchestrator.gate import calibrate_threshold

    return sorted({min(max(calibrate_threshold(np.asarray(scores), f), 0.0), 1.0) for f in fractions})


def _sig(seconds: float) -> float:
    return float(f"{max(seconds, 0.0):.6g}")


def profile_seconds(profile: dict, light: str, heavy: str, steps: int, height: int, width: int,
                    rows: int) -> tuple[float, float]:
    """(light_s, heavy_s) for one request alone from the orchestrator's latency model (profile.json)."""
    from triffusion.orchestrator.predictor import LatencyPredictor

    measured = {entry[0] for entry in profile.get("unet", [])}
    for model in (light, heavy):
        if model not in measured:
            raise ProfileError(f"{PROFILE_JSON} has no UNet times for '{model}'; rebuild without --no-profile, "
                               "or pass --latency measured")
    predictor = LatencyPredictor()
    predictor.seed(profile)
    decode = predictor.decode(height * width)
    light_s = predictor.encode(rows) + steps * predictor.unet_step(light, height, width, rows) + decode
    heavy_s = steps * predictor.unet_step(heavy, height, width, rows) + decode
    return light_s, heavy_s


def measured_seconds(metadata: list[dict], encode: bool) -> float:
    """Median per-request server time (s): denoise + decode, plus encode when `encode`."""
    stages = ("encode", "denoise", "decode") if encode else ("denoise", "decode")
    totals = []
    for meta in metadata:
        timings = meta.get("timings_ms") or {}
        if any(timings.get(stage) is None for stage in stages):
            raise ProfileError(f"request {meta.get('request_id')}: metadata timings_ms lacks {', '.join(stages)}")
        totals.append(sum(timings[stage] for stage in stages) / 1000.0)
    return statistics.median(totals)


# ------------------------------------------------------------------------------------------ the server


class Served:
    """The server's gRPC address, and a way to wait out a restart. The supervisor restarts a tritonserver
    that died; a request that met the dying server (UNAVAILABLE: the socket closed, the connection was
    refused, the orchestrator stopped) is sent again once the server is ready, up to `retries` times. The answer is the same: the
    image depends on the prompt and the seed only."""

    def __init__(self, server, ready_timeout_s: float, retries: int):
        self.server, self.url = server, server.urls["grpc"]
        self.ready_timeout_s, self.retries = ready_timeout_s, retries

    def call(self, what: str, send):
        for attempt in range(self.retries + 1):
            try:
                return send()
            except Exception as exc:  # noqa: BLE001 - GenerationError or InferenceServerException
                status = str(exc.status()) if callable(getattr(exc, "status", None)) else getattr(exc, "status", None)
                message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
                retryable = "UNAVAILABLE" in str(status) or status == "unreachable"
                if not retryable or attempt == self.retries:
                    raise ProfileError(f"{what}: {message}") from None
                print(f"{what}: {' '.join(message.split())}; waiting for the server, then again "
                      f"({attempt + 1} of {self.retries})", file=sys.stderr, flush=True)
                self.wait_ready()

    def wait_ready(self) -> None:
        import time

        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            supervisor = self.server.supervisor
            if supervisor is not None and getattr(supervisor, "gave_up", None):
                raise ProfileError(f"the server is down for good: {supervisor.gave_up}")
            client = grpcclient.InferenceServerClient(self.url)
            try:
                if client.is_server_ready(client_timeout=2.0):
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            finally:
                client.close()
            time.sleep(0.5)  # the supervisor restarts it; polling readiness is all the server offers
        raise ProfileError(f"the server at {self.url} was not ready again within {self.ready_timeout_s:g} s")


@contextlib.contextmanager
def serving(repo: Path, ready_timeout_s: float, retries: int = 2, log_file: str | None = None):
    from triffusion.server import ServerError, TritonServer, free_port

    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_file=log_file)
    try:
        with server:
            server.wait_ready(timeout_s=ready_timeout_s)
            yield Served(server, ready_timeout_s, retries)
    except ServerError as exc:
        raise ProfileError(f"cannot serve {repo}: {exc}") from None


def generate_all(served: Served, prompts: list[str], seed: int, unet: str, steps: int, fields: dict,
                 timeout_s: float, expect_model: str) -> tuple[list[np.ndarray], list[dict]]:
    """One unary request per prompt, in order, each alone (batch 1)."""
    from triffusion.client import generate

    images, metadata = [], []
    for i, prompt in enumerate(prompts):
        result = served.call(f"unet {unet}, steps {steps}, prompt {i}", lambda: generate(
            prompt, url=served.url, protocol="grpc", unet=unet, steps=steps, seed=seed + i, timeout_s=timeout_s,
            **fields))
        if result.metadata.get("unet") != expect_model:
            raise ProfileError(f"unet {unet}: answered by '{result.metadata.get('unet')}', expected '{expect_model}'")
        images.append(result.array)
        metadata.append(result.metadata)
    return images, metadata


def gate_scores(served: Served, images: list[np.ndarray], prompts: list[str], timeout_s: float) -> np.ndarray:
    """The repository's quality_gate over gRPC: image UINT8 [N, H, W, 3], prompt BYTES [N] -> score FP32 [N]."""
    import tritonclient.grpc as grpcclient

    def infer(batch: np.ndarray, text: np.ndarray) -> np.ndarray:
        client = grpcclient.InferenceServerClient(served.url)
        try:
            inputs = [grpcclient.InferInput("image", list(batch.shape), "UINT8"),
                      grpcclient.InferInput("prompt", [len(text)], "BYTES")]
            inputs[0].set_data_from_numpy(batch)
            inputs[1].set_data_from_numpy(text)
            result = client.infer(contract.QUALITY_GATE, inputs,
                                  outputs=[grpcclient.InferRequestedOutput("score")], client_timeout=timeout_s)
            return np.asarray(result.as_numpy("score"), dtype=np.float64).reshape(-1)
        finally:
            client.close()

    scores = []
    for start in range(0, len(images), SCORE_BATCH):
        batch = np.stack(images[start:start + SCORE_BATCH]).astype(np.uint8)
        text = np.array([p.encode("utf-8") for p in prompts[start:start + SCORE_BATCH]], dtype=np.object_)
        scores.append(served.call(f"{contract.QUALITY_GATE}, images {start}..{start + len(batch) - 1}",
                                  lambda: infer(batch, text)))
    out = np.concatenate(scores)
    if out.shape != (len(images),) or not np.isfinite(out).all():
        raise ProfileError(f"{contract.QUALITY_GATE}: expected {len(images)} finite scores, got {out.shape}")
    return out


# ------------------------------------------------------------------------------------------ run and write


def run(args) -> dict:
    """Everything but writing: {"options": [...], "info": {...}}."""
    from triffusion.orchestrator.registry import RegistryError, _check_options

    repo = Path(args.repo)
    steps_list = _parse(args.steps, int, "--steps", 1, 1000)
    thresholds = _parse(args.thresholds, float, "--thresholds", 0.0, 1.0)
    fractions = _parse(args.escalate, float, "--escalate", 0.0, 1.0) if getattr(args, "escalate", None) else None
    if args.n < 1:
        raise ProfileError(f"--n {args.n}: expected at least 1")
    if args.retries < 0:
        raise ProfileError(f"--retries {args.retries}: expected 0 or more")
    pipeline = read_pipeline(repo)
    light_name, heavy_name = request_names(pipeline)
    light_model, heavy_model = pipeline["cascade"]["light"], pipeline["cascade"]["heavy"]
    limits = pipeline.get("limits", {})
    height = args.height or limits.get("default_height", 512)
    width = args.width or limits.get("default_width", 512)
    profile = None
    if args.latency == "profile":
        try:
            profile = json.loads((repo / PROFILE_JSON).read_text())
        except OSError:
            raise ProfileError(f"{repo / PROFILE_JSON}: missing (exported with --no-profile?); "
                               "rebuild with a profile, or pass --latency measured") from None
    prompts = list(itertools.islice(itertools.cycle(load_prompts(args.prompts)), args.n))
    fields = {"height": height, "width": width}
    if args.guidance_scale is not None:
        fields["guidance_scale"] = args.guidance_scale
    light_scores, heavy_scores, light_s, heavy_s = {}, {}, {}, {}
    guidance = set()
    with serving(repo, args.ready_timeout_s, args.retries, args.server_log) as served:
        if args.latency == "measured":  # unrecorded: first calls pay for allocation and kernel selection
            for unet, model in ((light_name, light_model), (heavy_name, heavy_model)):
                generate_all(served, ["warm up"], args.seed, unet, steps_list[0], fields, args.timeout_s, model)
        for steps in steps_list:
            runs = {}
            for role, unet, model in (("light", light_name, light_model), ("heavy", heavy_name, heavy_model)):
                images, metadata = generate_all(served, prompts, args.seed, unet, steps, fields, args.timeout_s, model)
                guidance.update(float(m.get("guidance_scale", 7.5)) for m in metadata)
                runs[role] = (gate_scores(served, images, prompts, args.timeout_s), metadata)
                print(f"steps {steps:4d} {role:5s} ({unet}): mean gate score {runs[role][0].mean():.4f} "
                      f"over {len(images)} images", file=sys.stderr, flush=True)
            light_scores[steps], heavy_scores[steps] = runs["light"][0], runs["heavy"][0]
            if args.latency == "measured":
                light_s[steps] = measured_seconds(runs["light"][1], encode=True)
                heavy_s[steps] = measured_seconds(runs["heavy"][1], encode=False)
    rows = 2 if max(guidance) > 1.0 else 1
    if profile is not None:
        for steps in steps_list:
            light_s[steps], heavy_s[steps] = profile_seconds(profile, light_model, heavy_model, steps, height,
                                                             width, rows)
    if fractions is not None:
        options = [option for steps in steps_list for option in operating_points(
            {steps: light_scores[steps]}, {steps: heavy_scores[steps]},
            escalation_thresholds(light_scores[steps], fractions), light_s, heavy_s)]
    else:
        options = operating_points(light_scores, heavy_scores, thresholds, light_s, heavy_s)
    dearer = [steps for steps in steps_list if light_s[steps] > heavy_s[steps]]
    if dearer:  # a cascade only pays when its light model is the cheaper one
        source = f"{repo / PROFILE_JSON}'s times" if profile is not None else "the measured times"
        print(f"warning: at steps {', '.join(map(str, dearer))} the light model costs more per request than the "
              f"heavy one ({source}); check them, or compare with --latency "
              f"{'measured' if profile is not None else 'profile'}", file=sys.stderr)
    try:
        _check_options(options, "options")
    except RegistryError as exc:
        raise ProfileError(f"the profiled options are not valid registry options: {exc}") from None
    info = {"repo": str(repo), "light": {"unet": light_name, "model": light_model},
            "heavy": {"unet": heavy_name, "model": heavy_model}, "n": args.n, "seed": args.seed,
            "height": height, "width": width, "unet_rows": rows, "latency": args.latency,
            "scores": {str(s): {"light": [round(float(x), 6) for x in light_scores[s]],
                                "heavy": [round(float(x), 6) for x in heavy_scores[s]]} for s in steps_list}}
    return {"options": options, "info": info}


def update_pipeline(repo: Path, section: str, change) -> list[Path]:
    """`change(section)` applied to pipeline.json's `section` (what the orchestrator loads) and to the export
    manifest's copy of the pipeline (an up-to-date re-run of the export rewrites pipeline.json from it); the
    files written."""
    written = []
    path = repo / PIPELINE_JSON
    pipeline = json.loads(path.read_text())
    change(pipeline[section])
    path.write_text(json.dumps(pipeline, indent=2, sort_keys=True, default=str))  # as export writes it
    written.append(path)
    manifest_path = repo / MANIFEST_JSON
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if (manifest.get("pipeline") or {}).get(section):
            change(manifest["pipeline"][section])
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            written.append(manifest_path)
    return written


def write_options(repo: Path, options: list[dict]) -> list[Path]:
    """The options into the cascade section of pipeline.json and of the export manifest's pipeline."""
    return update_pipeline(repo, "cascade", lambda cascade: cascade.update(options=options))


def _parse(text: str, kind, flag: str, low: float, high: float) -> list:
    try:
        values = sorted({kind(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ProfileError(f"{flag} {text}: expected comma-separated {kind.__name__}s") from None
    if not values:
        raise ProfileError(f"{flag}: expected at least one value")
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise ProfileError(f"{flag} {bad[0]}: out of range; allowed {low:g}..{high:g}")
    return values


def _table(options: list[dict]) -> str:
    rows = [("threshold", "steps", "escalation", "quality", "light_s", "heavy_s")]
    rows += [(f"{o['threshold']:g}", str(o["steps"]), f"{o['escalation']:.3f}", f"{o['quality']:.4f}",
              f"{o['light_s']:.4g}", f"{o['heavy_s']:.4g}") for o in options]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _parser() -> OneLineParser:
    ap = OneLineParser(prog="python -m perf.profile_cascade", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="build/model_repository", help="a built model repository with a cascade")
    ap.add_argument("--steps", default="10,20", help="step counts (the controller's step budgets)")
    ap.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7", help="gate thresholds")
    ap.add_argument("--escalate", help="instead of --thresholds: escalation fractions; at each step count the "
                    "threshold under which that fraction of the profiled light answers score (DiffServe's way)")
    ap.add_argument("--n", type=int, default=64, help="prompts per model and step count")
    ap.add_argument("--prompts", default=str(PROMPTS_PATH), help="one prompt per line")
    ap.add_argument("--seed", type=int, default=0, help="prompt i gets seed + i on both models")
    ap.add_argument("--height", type=int, help="default: the repository's default height")
    ap.add_argument("--width", type=int, help="default: the repository's default width")
    ap.add_argument("--guidance-scale", type=float, help="default: the server's")
    ap.add_argument("--latency", choices=("profile", "measured"), default="profile",
                    help="GPU-seconds per request from profile.json's latency model, or measured per request")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0, help="for the server to load the repository")
    ap.add_argument("--retries", type=int, default=2,
                    help="times a request that met a dying server is sent again after the supervisor restarted it")
    ap.add_argument("--server-log", help="append the server's log to this file")
    ap.add_argument("--out", help="the options as JSON (the registry's cascade.options format)")
    ap.add_argument("--report", help="also a JSON report: the run's inputs and every gate score, per query")
    ap.add_argument("--write", action="store_true",
                    help="also into the repository's orchestrator/1/pipeline.json (cascade.options)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run(args)
    except (ProfileError, WorkloadError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    options = report["options"]
    print(_table(options))
    if args.out and not write_json(args.out, options):
        return 2
    if args.report and not write_json(args.report, {**report["info"], "options": options}):
        return 2
    if args.write:
        repo = Path(args.repo)
        try:
            written = write_options(repo, options)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {repo / PIPELINE_JSON}: cannot write the options ({exc})", file=sys.stderr)
            return 2
        print(f"wrote {len(options)} options into {', '.join(str(p) for p in written)}; the orchestrator's "
              "controller uses them at its next load")
        blocked = controller_blocked(repo)
        if blocked is not None:
            print(f"warning: the orchestrator's controller will not use them: {blocked} "
                  f"({repo / contract.ORCHESTRATOR / 'config.pbtxt'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
