"""Soak: thousands of mixed requests against a supervised server, with cancellations, bad inputs and one
stub kill mixed in; every request must get exactly one final answer, and memory must stay flat.

It exports the tiny preset (or takes --repo), serves it with the real supervised tritonserver, and runs
`--workers` client threads through a seeded sequence of request kinds over all three client paths:

    ok_stream   gRPC streaming front, progress responses included
    ok_unary    gRPC unary front
    ok_http     HTTP through the edge
    cancel      gRPC stream cancelled by the client after its first progress response
    timeout     HTTP with a request timeout shorter than the work (the front cancels it)
    bad         an invalid field (INVALID_ARG expected)

Halfway through, the UNet's stub is SIGKILLed once (the supervisor reloads it). Resident memory of
tritonserver and of every stub is sampled every second; growth is measured from the end of warm-up
(the first `--warmup` fraction of requests) to the end, over the processes alive at both points.

    python -m perf.soak --requests 2400 --out perf/results/cpu-tiny/soak.json
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from perf.cli import OneLineParser, device_name, write_json
from triffusion import contract, procs
from triffusion.client.api import error_message, infer_inputs

KINDS = {"ok_stream": 0.35, "ok_unary": 0.2, "ok_http": 0.15, "cancel": 0.1, "timeout": 0.05, "bad": 0.15}
BAD_FIELDS = [{"height": 100}, {"steps": 0}, {"guidance_scale": 99.0}, {"scheduler": "warp"}, {"prompt": ""},
              {"unet": "huge"}, {"prompt": "word " * 200}, {"stream": True}]
SCHEDULERS = ("euler", "ddim", "euler_a", "dpmpp_2m", "pndm", "unipc", "heun")
HANG_S = 120.0


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """tritonserver's and each stub's resident memory, every `period_s`, keyed by pid and instance."""

    def __init__(self, server_pid: int, period_s: float = 1.0):
        self.server_pid, self.period_s = server_pid, period_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            sample = {"t": round(time.monotonic() - start, 2), "tritonserver": rss_kb(self.server_pid), "stubs": {}}
            for instance, pid in procs.stubs(self.server_pid).items():
                sample["stubs"][f"{instance}:{pid}"] = rss_kb(pid)
            self.samples.append(sample)
            if self._stop.wait(self.period_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, t: float) -> dict:
        return min(self.samples, key=lambda s: abs(s["t"] - t))


def growth_pct(first: dict, last: dict) -> tuple[float, int, int]:
    """Growth of the summed RSS of the processes present in both samples (a reloaded stub is a new process)."""
    keys = [k for k in first["stubs"] if k in last["stubs"] and first["stubs"][k] and last["stubs"][k]]
    before = first["tritonserver"] + sum(first["stubs"][k] for k in keys)
    after = last["tritonserver"] + sum(last["stubs"][k] for k in keys)
    return 100.0 * (after - before) / before, before, after


def run_one(urls: dict, kind: str, fields: dict) -> dict:
    """One request of `kind`; its outcome and how many final answers it got."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    record = {"kind": kind, "finals": 0, "outcome": None}
    start = time.monotonic()
    try:
        if kind in ("ok_stream", "cancel"):
            answers: queue.Queue = queue.Queue()
            client = grpcclient.InferenceServerClient(urls["grpc"])
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            client.async_stream_infer(contract.TEXT_TO_IMAGE_STREAM, infer_inputs(grpcclient, {**fields, "stream": True}),
                                      request_id=uuid.uuid4().hex, enable_empty_final_response=True)
            deadline = start + HANG_S
            try:
                while time.monotonic() < deadline:
                    try:
                        result, error = answers.get(timeout=max(deadline - time.monotonic(), 0.01))
                    except queue.Empty:
                        break
                    if error is not None:
                        record["finals"] += 1
                        record["outcome"] = error_message(error).partition(":")[0]
                        break
                    if kind == "cancel" and result.as_numpy("progress") is not None:
                        client.stop_stream(cancel_requests=True)  # the client leaves mid-request
                        record["finals"], record["outcome"] = 1, "CANCELLED_BY_CLIENT"
                        break
                    final = result.get_response().parameters.get("triton_final_response")
                    if result.as_numpy("image") is not None:
                        record["outcome"] = "ok"
                    if final is not None and final.bool_param:
                        record["finals"] += 1
                        break
            finally:
                client.stop_stream(cancel_requests=True)
                client.close()
        elif kind in ("ok_unary",):
            client = grpcclient.InferenceServerClient(urls["grpc"])
            try:
                client.infer(contract.TEXT_TO_IMAGE, infer_inputs(grpcclient, fields), client_timeout=HANG_S)
                record["finals"], record["outcome"] = 1, "ok"
            finally:
                client.close()
        else:  # ok_http, timeout, bad (over HTTP: the edge and the unary front)
            client = httpclient.InferenceServerClient(urls["http"], network_timeout=HANG_S, connection_timeout=HANG_S)
            try:
                # The request's own timeout (microseconds): 30 ms, shorter than the work; the front cancels it.
                client.infer(contract.TEXT_TO_IMAGE, infer_inputs(httpclient, fields),
                             timeout=30_000 if kind == "timeout" else None)
                record["finals"], record["outcome"] = 1, "ok"
            finally:
                client.close()
    except Exception as exc:  # noqa: BLE001 - an error answer is an answer; its code is the outcome
        message = error_message(exc)
        record["finals"] = record["finals"] or 1
        record["outcome"] = message.partition(":")[0].strip() if ":" in message[:20] else message[:80]
        if "Deadline" in message:
            record["finals"] = 0  # the client gave up after HANG_S: the server never answered
    record["latency_s"] = round(time.monotonic() - start, 4)
    return record


def plan(n: int, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    requests = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        fields = {"prompt": f"a lighthouse, take {i}", "seed": i, "steps": rng.choice([4, 8, 12]),
                  "height": rng.choice([64, 64, 128]), "width": 64, "scheduler": rng.choice(SCHEDULERS)}
        if kind == "cancel":
            fields["steps"] = 60
        if kind == "timeout":
            fields.update(steps=80, height=256, width=256)
        if kind == "bad":
            fields.update(rng.choice(BAD_FIELDS))
        requests.append((kind, fields))
    return requests


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m perf.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2400)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of requests before memory counts")
    ap.add_argument("--kill", default=contract.UNET, help="model whose stub is killed halfway ('' for none)")
    ap.add_argument("--repo", help="a built model repository (default: export the tiny preset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from triffusion.server import TritonServer, free_port

    repo = args.repo
    if repo is None:
        import subprocess

        repo = str(Path(tempfile.mkdtemp()) / "repo")
        subprocess.run([sys.executable, "-m", "triffusion.export", "build", "--preset", "tiny", "--unet-variant",
                        "tiny-lite", "--cascade", "tiny-lite", "--out", repo], check=True, capture_output=True)
    log_file = Path(tempfile.mkdtemp()) / "server.log"
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_file=log_file)
    print(f"server log: {log_file}", file=sys.stderr)
    requests = plan(args.requests, args.seed)
    records: list[dict | None] = [None] * len(requests)
    progress = {"done": 0, "warm_t": None, "killed_t": None}
    lock = threading.Lock()
    with server:
        server.wait_ready(300)
        urls = server.urls
        sampler = RssSampler(server.process.pid)
        start = time.monotonic()
        jobs = iter(range(len(requests)))

        def worker():
            for i in jobs:  # the iterator hands each index to exactly one worker
                kind, fields = requests[i]
                records[i] = run_one(urls, kind, fields)
                with lock:
                    progress["done"] += 1
                    done = progress["done"]
                    if progress["warm_t"] is None and done >= args.warmup * len(requests):
                        progress["warm_t"] = time.monotonic() - start
                    kill_now = args.kill and progress["killed_t"] is None and done >= len(requests) // 2
                    if kill_now:
                        progress["killed_t"] = time.monotonic() - start
                if kill_now:
                    for pid in procs.stubs_of(server.process.pid, args.kill).values():
                        os.kill(pid, signal.SIGKILL)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        time.sleep(1.5)  # one more memory sample after the last request
        sampler.stop()
        reloads = dict(server.supervisor.counts) if server.supervisor else {}
    lost = sum(1 for r in records if r is None or r["finals"] != 1)
    outcomes = Counter(f"{r['kind']}:{r['outcome']}" for r in records if r)
    first, last = sampler.at(progress["warm_t"]), sampler.samples[-1]
    growth, before_kb, after_kb = growth_pct(first, last)
    server_growth = 100.0 * (last["tritonserver"] - first["tritonserver"]) / first["tritonserver"]
    ok = sum(1 for r in records if r and r["outcome"] == "ok")
    report = {
        "bench": "soak", "device": device_name("cpu"), "date": time.strftime("%Y-%m-%d"),
        "command": "python -m perf.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "requests": len(requests), "lost": lost, "answered_ok": ok, "elapsed_s": round(elapsed, 1),
        "throughput_rps": round(len(requests) / elapsed, 2), "workers": args.workers,
        "rss_growth_pct": round(growth, 2), "rss_kb_after_warmup": before_kb, "rss_kb_at_end": after_kb,
        # tritonserver alone (a small part of the total: the stubs hold the models)
        "tritonserver_rss_growth_pct": round(server_growth, 2),
        "tritonserver_rss_kb": [first["tritonserver"], last["tritonserver"]],
        "warmup_end_s": progress["warm_t"], "killed": args.kill or None, "killed_at_s": progress["killed_t"],
        "supervisor": {f"{action}:{model}": n for (action, model), n in reloads.items()},
        "outcomes": dict(sorted(outcomes.items())),
        "rss_samples": sampler.samples,
    }
    print(json.dumps({k: report[k] for k in ("requests", "lost", "answered_ok", "rss_growth_pct", "elapsed_s",
                                              "supervisor")}))
    if args.out and not write_json(args.out, report):
        return 2
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
