"""`triffusion serve | generate | export`: errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def _serve(args) -> int:
    from triffusion.server import TritonServer

    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_verbose=args.log_verbose)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        ready_s = server.wait_ready(args.ready_timeout)
        urls = server.urls
        print(f"ready in {ready_s:.1f} s: HTTP {urls['http']}, gRPC {urls['grpc']}, metrics {urls['metrics']}")
        print(f'try: {sys.argv[0]} generate "a red bicycle" --steps 20 --seed 7 -o out.png --url {urls["grpc"]}',
              flush=True)
        while not stop.is_set():
            if server.process.poll() is not None:
                print(f"error: tritonserver exited with code {server.process.returncode}\n{server.log_tail()}",
                      file=sys.stderr)
                return 1
            stop.wait(1.0)
        print("stopping", flush=True)
    return 0


def _generate(args) -> int:
    from triffusion.client import generate

    fields = {k: getattr(args, k) for k in ("negative_prompt", "height", "width", "steps", "guidance_scale",
                                             "seed", "scheduler")}
    bar = None
    on_progress = None
    if args.protocol == "grpc" and not args.no_progress:
        from tqdm import tqdm

        def on_progress(step, steps):
            nonlocal bar
            if bar is None:
                bar = tqdm(total=steps, unit="step", desc="denoising")
            bar.update(step - bar.n)

    try:
        result = generate(args.prompt, url=args.url, protocol=args.protocol, on_progress=on_progress, **fields)
    finally:
        if bar is not None:
            bar.close()
    result.image.save(args.output)
    print(json.dumps({"output": args.output, **result.metadata}))
    return 0


def _export(argv: list[str]) -> int:
    from triffusion.export.__main__ import main as export_main

    return export_main(argv) or 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triffusion", description="text-to-image serving on Triton")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the bundled tritonserver on a model repository")
    s.add_argument("--repo", default="build/model_repository")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument("--ready-timeout", type=float, default=300.0)
    g = sub.add_parser("generate", help="generate one image")
    g.add_argument("prompt")
    g.add_argument("--negative-prompt")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--scheduler")
    g.add_argument("--url", help="host:port (default localhost:8001 for grpc, localhost:8000 for http)")
    g.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--no-progress", action="store_true")
    sub.add_parser("export", help="export a pipeline (see python -m triffusion.export --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    args = parser().parse_args(argv)
    try:
        return _serve(args) if args.command == "serve" else _generate(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
