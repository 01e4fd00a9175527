"""Overload runs: bursts beyond capacity, where admission control rejects and a run must go on.

perf_analyzer stops at the first failed request, so this is a small asyncio load generator on
tritonclient's aio gRPC client. Every request is sent at its arrival time (one gRPC stream per request to
the decoupled orchestrator, or a unary call to text_to_image) and ends as exactly one of

    ok        finished within its slo_ms (or had none), as the client measured it
    late      finished, but after its slo_ms
    rejected  UNAVAILABLE from the server (full queue, SLO infeasible at admission), with the reason
    error     anything else: INVALID_ARG, INTERNAL, a client timeout, an unreachable server

    python -m perf.overload --url localhost:8001 --capacity 2 --factor 4 --duration 5 \
        --size 64 --steps 10 --slo-ms 2000 --out overload.json
    python -m perf.overload --url localhost:8001 --rate 8 --duration 5 --mix tiny-smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

from perf.cli import OneLineParser, write_json
from perf.perf_analyzer_slo import HarnessError, check_server
from perf.workloads import WorkloadError, load_mix, load_prompts, poisson_arrivals, sample_requests
from triffusion import contract
from triffusion.client import request_arrays

OUTCOMES = ("ok", "late", "rejected", "error")
DEFAULT_TIMEOUT_S = 120.0

# The server leads every error message with Triton's code ("UNAVAILABLE: queue is full ..."); a transport
# failure (connection refused) carries a gRPC status but no such prefix, so it is an error, not a rejection.
CODE_PREFIX = re.compile(r"^\s*([A-Z_]+): ")
# Rejections the orchestrator's scheduler gives, by a short key; anything else is keyed by its first clause.
KNOWN_REASONS = (
    ("queue_full", re.compile(r"queue is full")),
    ("slo_infeasible", re.compile(r"slo_ms \d+ cannot be met")),
    ("would_break_admitted_slo", re.compile(r"would make request .* miss its SLO")),
)


def split_code(message: str) -> tuple[str | None, str]:
    """(Triton code, rest) of a server message; (None, message) when it leads with no code."""
    match = CODE_PREFIX.match(message)
    return (match.group(1), message[match.end():]) if match else (None, message.strip())


def reason_key(message: str) -> str:
    """A short, load-independent key for a rejection or error message, for counting."""
    code, body = split_code(message)
    for key, pattern in KNOWN_REASONS:
        if pattern.search(body):
            return key
    clause = re.sub(r"\d+", "N", body.split(":")[0]).strip()[:60] or "unknown"
    return clause if code in (None, "UNAVAILABLE") else f"{code}: {clause}"


@dataclass
class RequestRecord:
    """One request of a run; times are seconds since the run started (monotonic clock)."""

    index: int
    arrival_s: float  # when it was due
    slo_ms: int | None
    sent_s: float | None = None
    finished_s: float | None = None
    outcome: str | None = None  # one of OUTCOMES once it ended
    reason: str | None = None  # rejected and error: reason_key(message)
    message: str | None = None  # rejected and error: the text as received
    slo_met: bool | None = None  # the server's own verdict, from metadata
    steps_done: int | None = None
    unet: str | None = None
    degraded_from_steps: int | None = None
    timings_ms: dict | None = None  # the server's, from metadata

    @property
    def latency_ms(self) -> float | None:
        if self.sent_s is None or self.finished_s is None:
            return None
        return (self.finished_s - self.sent_s) * 1000.0

    def complete(self, finished_s: float, metadata: dict) -> None:
        """A final image arrived: ok, or late when the client saw it after slo_ms."""
        self.finished_s = finished_s
        for name in ("slo_met", "steps_done", "unet", "degraded_from_steps", "timings_ms"):
            setattr(self, name, metadata.get(name))
        late = self.slo_ms is not None and self.latency_ms > self.slo_ms
        self.outcome = "late" if late else "ok"

    def fail(self, finished_s: float, message: str) -> None:
        """The request ended without an image: rejected for the server's UNAVAILABLE, else an error."""
        self.finished_s, self.message = finished_s, message
        self.outcome = "rejected" if split_code(message)[0] == "UNAVAILABLE" else "error"
        self.reason = reason_key(message)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest rank, as perf.perf_analyzer_slo.slo_summary picks it."""
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 1)


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration_s: float  # from the run's start to the last request's end
    model: str = contract.TEXT_TO_IMAGE_STREAM
    url: str | None = None

    def summary(self) -> dict:
        counts = Counter(r.outcome for r in self.records)
        unknown = set(counts) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"records with outcome {sorted(unknown, key=str)}; allowed: {', '.join(OUTCOMES)}")
        accepted = sorted(r.latency_ms for r in self.records if r.outcome in ("ok", "late"))
        sent = len(self.records)
        return {
            "sent": sent,
            "accepted": counts["ok"] + counts["late"],
            "ok": counts["ok"],
            "late": counts["late"],
            "rejected": counts["rejected"],
            "rejected_reasons": Counter(r.reason for r in self.records if r.outcome == "rejected"),
            "errors": counts["error"],
            "error_reasons": Counter(r.reason for r in self.records if r.outcome == "error"),
            "degraded": sum(1 for r in self.records if r.degraded_from_steps is not None),
            "attainment": round(counts["ok"] / sent, 4) if sent else None,
            "goodput_rps": round(counts["ok"] / self.duration_s, 4) if self.duration_s > 0 else None,
            "p50_ms": _percentile(accepted, 0.5),
            "p99_ms": _percentile(accepted, 0.99),
            "duration_s": round(self.duration_s, 3),
        }

    def to_json(self) -> dict:
        return {"model": self.model, "url": self.url, "summary": self.summary(),
                "requests": [asdict(r) | {"latency_ms": r.latency_ms} for r in self.records]}


def burst_arrivals(capacity_rps: float, factor: float, duration_s: float, seed: int) -> list[float]:
    """Sorted arrival times (s) of a Poisson burst at `factor` x `capacity_rps` over [0, duration_s)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise WorkloadError(f"factor: {factor!r} is not allowed; allowed a number > 0")
    if isinstance(capacity_rps, bool) or not isinstance(capacity_rps, (int, float)) or not capacity_rps > 0:
        raise WorkloadError(f"capacity_rps: {capacity_rps!r} is not allowed; allowed a number > 0")
    return poisson_arrivals(capacity_rps * factor, duration_s, seed)


# ------------------------------------------------------------------------------------------------ sending


def _infer_inputs(request: dict, batched: bool = False) -> list:
    """The request's inputs; `batched`: with the leading batch dimension of a model with max_batch_size > 0
    (the batching baseline, behind Triton's dynamic batcher)."""
    import tritonclient.grpc as grpcclient

    fields = dict(request)
    inputs = []
    for name, (array, dtype) in request_arrays(fields.pop("prompt"), **fields).items():
        if batched:
            array = array[None]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


async def _stream_once(client, model: str, inputs: list):
    """One request over its own gRPC stream; returns the final result, or raises with the server's error.

    The request side stays open until the final response so that the stream is not half-closed early;
    progress and preview responses (with `stream`) are skipped. Leaving (done or cancelled by a timeout)
    cancels the call, which stops an unfinished request at the server's next step boundary."""
    from tritonclient.utils import InferenceServerException

    final = asyncio.Event()

    async def request_side():
        yield {"model_name": model, "inputs": inputs, "request_id": uuid.uuid4().hex}
        await final.wait()

    responses = client.stream_infer(request_side())
    try:
        async for result, error in responses:
            if error is not None:
                raise error
            if result.as_numpy("image") is not None:
                return result
        raise InferenceServerException(f"{model}: stream ended without a final response")
    finally:
        final.set()
        responses.cancel()


async def _send(client, model: str, record: RequestRecord, request: dict, start: float, timeout_s: float,
                batched: bool = False) -> None:
    import grpc
    from tritonclient.utils import InferenceServerException

    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + record.arrival_s - loop.time()))  # the arrival schedule, not a wait
    inputs = _infer_inputs(request, batched)
    record.sent_s = loop.time() - start
    if model == contract.TEXT_TO_IMAGE_STREAM:
        call = _stream_once(client, model, inputs)
    else:
        call = client.infer(model, inputs, request_id=uuid.uuid4().hex)
    try:
        result = await asyncio.wait_for(call, timeout_s)
    except asyncio.TimeoutError:
        record.fail(loop.time() - start, f"timeout: no final response within {timeout_s:g} s")
    except InferenceServerException as exc:
        # Server errors lead with their code; a connection failure has none, so it stays an error.
        record.fail(loop.time() - start, exc.message() or str(exc))
    except grpc.RpcError as exc:  # raised by the stream iterator itself: the transport failed
        record.fail(loop.time() - start, f"transport {exc.code().name}: {exc.details()}")
    else:
        record.complete(loop.time() - start, json.loads(result.as_numpy("metadata").reshape(-1)[0]))


async def run_load(url: str, requests: list[dict], arrivals: list[float], *, model: str = contract.TEXT_TO_IMAGE_STREAM,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> LoadResult:
    """Send requests[i] (orchestrator inputs by name; `prompt` required) at arrivals[i] seconds after the
    start, all concurrently over one channel, and record how each ended."""
    if len(requests) != len(arrivals):
        raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times; give one per request")
    if any(t < 0 for t in arrivals):
        raise ValueError("arrivals: must be >= 0 seconds")
    missing = [i for i, r in enumerate(requests) if not r.get("prompt")]
    if missing:
        raise ValueError(f"requests[{missing[0]}]: no prompt; every request needs one")
    import tritonclient.grpc.aio as aioclient

    records = [RequestRecord(index=i, arrival_s=float(t), slo_ms=r.get("slo_ms"))
               for i, (r, t) in enumerate(zip(requests, arrivals))]
    loop = asyncio.get_running_loop()
    async with aioclient.InferenceServerClient(url) as client:
        config = await client.get_model_config(model, as_json=True)
        batched = int(config["config"].get("max_batch_size", 0)) > 0
        start = loop.time()
        await asyncio.gather(*(_send(client, model, rec, req, start, timeout_s, batched)
                               for rec, req in zip(records, requests)))
        duration = loop.time() - start
    return LoadResult(records=records, duration_s=duration, model=model, url=url)


# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m perf.overload", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    ap.add_argument("--model", default=contract.TEXT_TO_IMAGE_STREAM,
                    help=f"{contract.TEXT_TO_IMAGE_STREAM} (streamed) or {contract.TEXT_TO_IMAGE} (unary)")
    load = ap.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="Poisson arrivals per second")
    load.add_argument("--capacity", type=float, help="requests per second the server sustains; with --factor")
    ap.add_argument("--factor", type=float, help="with --capacity: offered load as a multiple of it")
    ap.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", help="a mix in perf/workloads/mixes.yaml; replaces --size, --steps and --slo-ms")
    ap.add_argument("--size", type=int, help="height and width (default 64)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 10)")
    ap.add_argument("--slo-ms", type=int, help="per-request SLO (default 2000)")
    ap.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="client-side limit per request")
    ap.add_argument("--out", help="write the summary and every request's record as JSON")
    return ap


def _workload(args) -> tuple[list[dict], list[float]]:
    if (args.capacity is None) != (args.factor is None):
        raise HarnessError("--capacity and --factor go together")
    arrivals = (poisson_arrivals(args.rate, args.duration, args.seed) if args.rate is not None
                else burst_arrivals(args.capacity, args.factor, args.duration, args.seed))
    prompts = load_prompts()
    if args.mix is not None:
        given = [flag for flag, value in (("--size", args.size), ("--steps", args.steps), ("--slo-ms", args.slo_ms))
                 if value is not None]
        if given:
            raise HarnessError(f"{given[0]} does not apply with --mix (the mix sets it)")
        return sample_requests(load_mix(args.mix), prompts, len(arrivals), args.seed), arrivals
    size = 64 if args.size is None else args.size
    steps = 10 if args.steps is None else args.steps
    slo_ms = 2000 if args.slo_ms is None else args.slo_ms
    requests = [{"prompt": prompts[i % len(prompts)], "height": size, "width": size, "steps": steps,
                 "seed": args.seed + i, "slo_ms": slo_ms} for i in range(len(arrivals))]
    return requests, arrivals


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        requests, arrivals = _workload(args)
        check_server(args.url, args.model)
        result = asyncio.run(run_load(args.url, requests, arrivals, model=args.model, timeout_s=args.timeout_s))
    except (HarnessError, WorkloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary()))
    if args.out and not write_json(args.out, {"bench": "overload", "args": vars(args), **result.to_json()}):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
