"""`triffusion serve | generate | export`: errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def _serve(args) -> int:
    import logging

    from triffusion.server import TritonServer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_verbose=args.log_verbose, host=args.host,
                          drain_grace_s=args.grace)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        ready_s = server.wait_ready(args.ready_timeout)
        urls = server.urls
        print(f"ready in {ready_s:.1f} s on {args.host}: HTTP {urls['http']}, gRPC {urls['grpc']}, "
              f"metrics {urls['metrics']}")
        print(f'try: {sys.argv[0]} generate "a red bicycle" --steps 20 --seed 7 -o out.png --url {urls["grpc"]}',
              flush=True)
        while not stop.is_set():
            if server.supervisor.gave_up:  # restarted too often: let the service manager take over
                print(f"error: {server.supervisor.gave_up}\n{server.log_tail()}", file=sys.stderr)
                return 1
            stop.wait(1.0)
        print(f"stopping: new requests get UNAVAILABLE; waiting up to {args.grace:.0f} s for those in flight",
              flush=True)
    finally:
        server.stop()
    return 0


# Request fields `generate` sends, one option each: every request input but `prompt` (positional) and
# `stream` (the command streams over gRPC when it shows progress or saves previews). Ranges and choices come
# from the server's INVALID_ARG answers, which name the field and what it allows.
GENERATE_FIELDS = ("negative_prompt", "height", "width", "steps", "guidance_scale", "seed", "scheduler",
                   "slo_ms", "slo_class", "priority", "min_steps", "step_mode", "unet", "preview_every", "lora",
                   "control_image", "controlnet", "controlnet_scale")


def _generate(args) -> int:
    from pathlib import Path

    from triffusion.client import generate, start_stream_generation

    fields = {k: getattr(args, k) for k in GENERATE_FIELDS}
    # Over HTTP, preview_every goes to the unary front, which refuses it naming the field.
    stream = args.protocol == "grpc" and (not args.no_progress or bool(args.preview_every))
    output = Path(args.output)
    bar = None
    last_step = 0
    previews: list[str] = []

    def on_progress(step, steps):
        nonlocal bar, last_step
        last_step = step
        if args.no_progress:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=steps, unit="step", desc="denoising")
        bar.update(step - bar.n)

    def on_preview(image):  # the server sends a preview right after that step's progress
        from PIL import Image

        path = output.with_name(f"{output.stem}.preview-{last_step}.png")
        Image.fromarray(image).save(path)
        previews.append(str(path))

    if args.protocol == "http":  # tritonclient.http runs on gevent, whose hub would print Ctrl-C as a failure
        import gevent

        hub = gevent.get_hub()
        hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)
    try:
        if stream:
            handle = start_stream_generation(args.prompt, url=args.url, on_progress=on_progress,
                                             on_preview=on_preview, timeout_s=args.timeout, **fields)
            result = handle.result(args.timeout)  # Ctrl-C here cancels the request on the server
        else:  # unary: over gRPC, Ctrl-C cancels the call and with it the request on the server
            result = generate(args.prompt, url=args.url, protocol=args.protocol, timeout_s=args.timeout, **fields)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print("cancelled", file=sys.stderr, flush=True)
        return 130
    finally:
        if bar is not None:
            bar.close()
    result.image.save(output)
    print(json.dumps({"output": str(output), **({"previews": previews} if previews else {}), **result.metadata}))
    return 0


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


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
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: localhost only; see the README before exposing it)")
    s.add_argument("--grace", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds the requests in flight get to finish")
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument("--ready-timeout", type=float, default=300.0)
    from triffusion.orchestrator.params import STEP_MODES  # what the server's validation accepts

    g = sub.add_parser(
        "generate", help="generate one image",
        description="Generate one image and print its metadata as JSON. Out-of-range values are refused by the "
                    "server, which names the field and what it allows (exit 2). Over gRPC (the default) progress "
                    "streams; Ctrl-C cancels the request on the server (it frees its slot at the next step), "
                    "prints 'cancelled' and exits 130. Over HTTP the server cannot see Ctrl-C: it stops only at "
                    "--timeout.")
    g.add_argument("prompt")
    g.add_argument("--negative-prompt")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--scheduler")
    g.add_argument("--slo-ms", type=int, help="end-to-end latency objective; a server that cannot meet it "
                                               "refuses at once (UNAVAILABLE)")
    g.add_argument("--priority", type=int, help="higher runs first under the edf and priority policies")
    g.add_argument("--slo-class", help="a served SLO class (e.g. interactive): its SLO, priority and quality "
                                       "floor; the server lists its classes when the name is wrong")
    g.add_argument("--min-steps", type=int, help="may serve fewer steps, down to this, to meet --slo-ms")
    g.add_argument("--step-mode", choices=STEP_MODES, help="fixed (default): exactly --steps; auto: the server "
                                                           "may stop early once the image settles")
    g.add_argument("--control-image", metavar="PATH", help="an already processed control image (edges, depth, pose "
                   "map) of the request's height x width, for --controlnet")
    g.add_argument("--controlnet", metavar="NAME", help="a ControlNet the server registered (e.g. canny)")
    g.add_argument("--controlnet-scale", type=float, metavar="SCALE", help="its conditioning scale (default 1.0)")
    g.add_argument("--unet", help='served UNet variant: "default", a preset named at export, or "cascade"')
    g.add_argument("--lora", metavar="NAME:SCALE[,NAME:SCALE]",
                   help="registered LoRA adapters and their scales (e.g. watercolor:0.8); the server lists its "
                        "adapters when a name is wrong")
    g.add_argument("--preview-every", type=int, metavar="N",
                   help="gRPC only: save a low-resolution preview every N steps as OUTPUT_STEM.preview-STEP.png "
                        "next to --output (latent resolution, 1/8 of the image; not after the last step)")
    g.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS",
                   help="the request's deadline: past it the server stops the work and this exits 2")
    g.add_argument("--url", help="host:port (default localhost:8001 for grpc, localhost:8000 for http)")
    g.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (over gRPC: a unary call, unless "
                                                               "--preview-every)")
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
