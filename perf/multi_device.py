"""One orchestrator, many devices, on CPU stand-ins: what an engine per device in one process costs, and what
placing by load buys over placing in turn.

A stand-in device is an executor whose UNet call sleeps for the time the latency model gives (rows x pixels),
as a host thread waits on a GPU: the GIL is free meanwhile. Everything else is real: each device's
StepScheduler, Runner (torch sampler steps on the CPU) and Engine loop thread, and the EngineGroup placing
requests. So the figures say how far one Python process drives N devices before its own work (scheduling,
sampling, the GIL) limits it, and how placement policies compare under a mixed workload.

1. Scaling: a closed loop keeps 2 x max_active requests per device in flight for --seconds; images/s for
   N = 1, 2, 4, 8 devices against N x the one-device figure.
2. Placement: Poisson arrivals of a mixed workload (64^2 and 256^2, SLOs) on --devices devices at --load of
   their capacity; attainment (met / sent) per policy: least_finish, least_loaded, round_robin.

    python -m perf.multi_device --out perf/results/cpu-tiny/multi_device.json
"""

from __future__ import annotations

import json
import queue
import random
import sys
import threading
import time

import numpy as np

from perf.cli import OneLineParser, device_name, write_json
from triffusion.orchestrator.engine import PipelineSpec, make_engine
from triffusion.orchestrator.errors import ServingError
from triffusion.orchestrator.group import EngineGroup
from triffusion.orchestrator.params import GenerationParams
from triffusion.orchestrator.placement import PLACEMENTS
from triffusion.orchestrator.request import RequestState
from triffusion.orchestrator.scheduler import StepScheduler

SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                    "steps_offset": 1, "timestep_spacing": "leading"}
SPEC = PipelineSpec(model="standin", scheduler_config=SCHEDULER_CONFIG)


class StandInDevice:
    """An executor that spends device time by sleeping (the GIL is released, as in a wait on a GPU)."""

    def __init__(self, step_s_per_row_pixel: float, fixed_s: float):
        self.per, self.fixed = step_s_per_row_pixel, fixed_s

    def encode(self, input_ids):
        time.sleep(0.002)
        return np.zeros((len(input_ids), 77, 32), np.float32)

    def denoise(self, model, sample, timestep, text_embeddings):
        n, _, h, w = sample.shape
        time.sleep(self.fixed + self.per * n * h * w * 64)  # latent to image pixels
        return 0.1 * sample

    def decode(self, latent):
        n, _, h, w = latent.shape
        time.sleep(0.002 + 1e-8 * n * h * w * 64)
        return np.zeros((n, 3, 8 * h, 8 * w), np.float32)


class Sink:
    def __init__(self, done):
        self.done, self.outcome, self.finished = done, None, None

    def progress(self, step, steps): ...
    def preview(self, image): ...

    def finish(self, image, metadata):
        self.outcome, self.finished = "finish", time.monotonic()
        self.done(self)

    def fail(self, error):
        self.outcome, self.finished = "fail", time.monotonic()
        self.done(self)


def state(i: int, size: int, steps: int, slo_ms: int | None, sink) -> RequestState:
    params = GenerationParams(prompt="p", height=size, width=size, steps=steps, guidance_scale=7.5, seed=i,
                              slo_ms=slo_ms)
    ids = np.full((2, 77), 49407, np.int64)
    return RequestState(request_id=f"q{i}", params=params, sink=sink, input_ids=ids)


def group(n: int, placement: str, args) -> EngineGroup:
    profile = {"unet": [["unet", s, s, r, args.fixed_ms / 1000 + args.per_pixel * r * s * s]
                        for s in (64, 256) for r in (2, 4, 8, 16)],
               "stages": [["encode", 2, 0.002], ["decode", 4096, 0.002]]}
    engines = []
    for _ in range(n):
        from triffusion.orchestrator.predictor import LatencyPredictor

        predictor = LatencyPredictor()
        predictor.seed(profile)
        scheduler = StepScheduler(max_active=args.max_active, max_queue=64, max_batch=16, predictor=predictor)
        engines.append(make_engine(StandInDevice(args.per_pixel, args.fixed_ms / 1000), SPEC, scheduler))
    return EngineGroup(engines, placement)


def scaling(n: int, args) -> dict:
    """Closed loop: 2 x max_active requests per device always in flight, 64^2, 20 steps, for args.seconds."""
    g = group(n, "least_finish", args)
    g.start()
    lock, finished, counter = threading.Lock(), [], iter(range(10**9))
    stop = time.monotonic() + args.seconds

    def done(sink):
        with lock:
            finished.append(sink.finished)
        if time.monotonic() < stop:
            submit()

    def submit():
        g.submit(state(next(counter), 64, 20, None, Sink(done)))

    started = time.monotonic()
    for _ in range(2 * args.max_active * n):
        submit()
    time.sleep(args.seconds)  # the run's length: the loop above keeps the devices busy meanwhile
    g.stop(grace_s=0)
    with lock:  # steady state: the first requests' ramp (encode, the first batch's steps) is left out
        window = [t for t in finished if started + args.warmup_s <= t <= started + args.seconds]
    seconds = args.seconds - args.warmup_s
    return {"devices": n, "images": len(window), "images_per_s": round(len(window) / seconds, 2), "placed": g.placed}


def placement_run(policy: str, args, capacity: float, load: float) -> dict:
    g = group(args.devices, policy, args)
    g.start()
    rng = random.Random(args.seed)
    rate = load * capacity
    t, arrivals = 0.0, []
    while t < args.seconds:
        t += rng.expovariate(rate)
        arrivals.append(t)
    kinds = [(64, 20, 1500), (256, 20, 4000)]
    sinks, deadlines = [], []
    answers: queue.Queue = queue.Queue()
    start = time.monotonic()
    rejected: dict[str, int] = {}
    for i, at in enumerate(arrivals):
        size, steps, slo = kinds[0] if rng.random() < 0.7 else kinds[1]
        time.sleep(max(0.0, start + at - time.monotonic()))  # the arrival schedule
        sink = Sink(answers.put)
        try:
            g.submit(state(i, size, steps, slo, sink))
        except ServingError as exc:
            reason = exc.reason or exc.code.name
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        sinks.append(sink)
        deadlines.append(time.monotonic() + slo / 1000)
    for _ in sinks:
        answers.get(timeout=120)
    g.stop(grace_s=0)
    met = sum(1 for s, d in zip(sinks, deadlines) if s.outcome == "finish" and s.finished <= d)
    late = sum(1 for s, d in zip(sinks, deadlines) if s.outcome == "finish" and s.finished > d)
    return {"policy": policy, "load": load, "rate": round(rate, 2), "sent": len(arrivals), "met": met, "late": late, "rejected": rejected,
            "attainment": round(met / len(arrivals), 4), "placed": g.placed,
            "iteration_scale": [round(e.scheduler.iteration_scale, 2) for e in g.engines]}


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m perf.multi_device", description=__doc__.splitlines()[0])
    ap.add_argument("--devices-list", default="1,2,4,8")
    ap.add_argument("--devices", type=int, default=4, help="devices of the placement comparison")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--fixed-ms", type=float, default=30.0, help="stand-in UNet call: fixed part")
    ap.add_argument("--per-pixel", type=float, default=3e-8, help="stand-in UNet call: seconds per row x image pixel")
    ap.add_argument("--loads", default="0.6,0.9,1.2", help="placement runs: offered load / nominal capacity")
    ap.add_argument("--warmup-s", type=float, default=1.5, help="scaling runs: finishes before this are not counted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    report = {"bench": "multi_device", "device": device_name("cpu"), "date": time.strftime("%Y-%m-%d"),
              "command": "python -m perf.multi_device " + " ".join(argv if argv is not None else sys.argv[1:]),
              "stand_in": {"fixed_ms": args.fixed_ms, "per_row_pixel_s": args.per_pixel}}
    rows = [scaling(int(n), args) for n in args.devices_list.split(",")]
    base = rows[0]["images_per_s"] / int(args.devices_list.split(",")[0])
    for row in rows:
        row["efficiency"] = round(row["images_per_s"] / (base * row["devices"]), 3) if base else None
        print(json.dumps(row), flush=True)
    report["scaling"] = rows
    # Capacity of the mixed workload on one device, from the closed-loop 64^2 figure scaled by the mix's cost.
    per_image_64 = 1 / base if base else 1.0
    mean_cost = 0.7 * per_image_64 + 0.3 * per_image_64 * (args.fixed_ms / 1000 + args.per_pixel * 2 * 256 * 256) / (
        args.fixed_ms / 1000 + args.per_pixel * 2 * 64 * 64)
    capacity = args.devices / mean_cost
    report["placement"] = {"devices": args.devices, "nominal_capacity_rps": round(capacity, 2),
                           "mix": "70% 64x64 (slo 1500 ms), 30% 256x256 (slo 4000 ms), 20 steps, Poisson",
                           "runs": [placement_run(p, args, capacity, float(load))
                                    for load in args.loads.split(",") for p in PLACEMENTS]}
    for run in report["placement"]["runs"]:
        print(json.dumps(run), flush=True)
    return 0 if write_json(args.out, report) else 2


if __name__ == "__main__":
    raise SystemExit(main())
