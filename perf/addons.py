"""Add-on modules benchmark (issue 14, LoRA part): many LoRA adapters served in one batch against a baseline
that merges each request's adapter into the UNet's weights (and unmerges it) as requests switch adapters.

    python -m perf.addons [--preset sd15-small] [--steps 2] [--requests 6] [--loads 0.25,1] [--write]

Both systems run here, in this process, one after the other on the same trace (80% of requests carry one of
20 adapters, Zipf-distributed, 20% none), with the same UNet, text encoder and VAE:
- candidate: the orchestrator's engine (the server's scheduler and runner) with the adapter UNet of
  triffusion.lora (base weights untouched, per-row adapter slots, one UNet call for every adapter) and the
  residency of orchestrator.adapters (an LRU of slots sized in MiB, loads off the engine thread);
- merge baseline: requests one at a time (FCFS); when a request's adapter differs from the one merged into
  the weights, the old one is unmerged and the new one merged (W += scale * B @ A over every target layer),
  the way a server that patches weights per request works (diffusers' fuse_lora/unfuse_lora).
Loads are arrivals per solo request latency (measured first, on the base model); the SLO is 4x that latency.
Goodput: requests finished within their SLO per second (first arrival to last answer); goodput at 99% SLO:
the best goodput over the loads at which >= 99% of the requests met the SLO (0 if none did; the ratio is then
None, and `goodput_ratio_at_each_load` gives the plain ratios). The two systems run one after the other on
each trace, in alternating order: the CPU is shared, so their figures move with what else runs.

The UNet: the sd15-small preset by default (BK-SDM-Small: SD1.5's channels and attention widths, one
transformer block per stage; 482 M parameters, 108 LoRA target layers holding 139 M weights), seeded random
weights, 64x64 images: a merge touches every attention and feed-forward weight at SD1.5's widths (SD1.5 has
about twice the target weights), while the UNet steps stay within a short CPU run. The text encoder and the
VAE are light stand-ins (see _build): both systems run the same ones, and the time goes to the UNet. The
numbers say which preset ran."""

from __future__ import annotations

import argparse
import copy
import json
import platform
import queue
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from perf.inprocess import Collect, drain, serve_fields

RESULTS = Path(__file__).resolve().parent / "results" / "cpu-tiny" / "addons.json"
PARITY_TOLERANCE = 2  # uint8 levels, max over pixels: fused weights vs per-row deltas round differently


# ---- references ----------------------------------------------------------------------------------------
def _pipeline(repo: Path) -> dict:
    return json.loads((Path(repo) / "orchestrator" / "1" / "pipeline.json").read_text())


def _components(repo: Path):
    from triffusion.runtime import create_runtime

    pipeline = _pipeline(repo)
    load = lambda name: create_runtime("onnxruntime", Path(repo) / pipeline["artifacts"][name])
    return pipeline, load("text_encoder"), load("vae_decoder")


def base_unet(repo: Path):
    from triffusion import components

    return components.UNet.load_pretrained(Path(repo) / _pipeline(repo)["lora"]["artifact"]).eval()


def registered_adapter(repo: Path, name: str, unet):
    from triffusion import lora

    entry = _pipeline(repo)["lora"]["adapters"][name]
    return lora.load_adapter(name, Path(repo) / entry["file"], unet)


def fused_reference(repo: Path, request: dict) -> np.ndarray:
    """The request served alone by the orchestrator's engine on a UNet with its adapters merged into the
    weights (diffusers' fuse_lora, by hand: W += scale * B @ A), the other components the repository's."""
    from triffusion import components, lora
    from triffusion.orchestrator.executor import RuntimeExecutor
    from triffusion.runtime import TorchRuntime

    pipeline, text_encoder, vae = _components(repo)
    unet = base_unet(repo)
    for item in filter(None, (request.get("lora") or "").split(",")):
        name, _, scale = item.partition(":")
        lora.merge(unet, registered_adapter(repo, name.strip(), unet), float(scale or 1.0))
    spec = components.UNet.from_model(unet)
    runtime = TorchRuntime(components.UNet.wrap(unet), spec.input_names, spec.output_names)
    executor = RuntimeExecutor(text_encoder, {"unet": runtime}, vae)
    plain = {k: v for k, v in request.items() if k != "lora"}
    (image, _), = _serve(repo, pipeline, executor, [plain], lora_limits=False)
    return image


def _serve(repo, pipeline, executor, requests, lora_limits=True):
    from triffusion.orchestrator.config import OrchestratorConfig, build_engine
    from triffusion.orchestrator.params import Limits

    engine, limits = build_engine(OrchestratorConfig(admission="off"), pipeline, executor)
    if not lora_limits:
        limits = Limits.from_dict({k: v for k, v in pipeline["limits"].items() if k not in ("adapters", "max_lora")})
    return serve_fields(engine, limits, repo, requests, prefix="ref")


def image_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


# ---- the benchmark ----------------------------------------------------------------------------------
def _build(preset: str, seed: int = 0, light_sides: bool = False):
    """A preset's pipeline with seeded random weights, as torch runtimes (text encoder, VAE) and its UNet.
    `light_sides`: the tiny preset's VAE and a one-layer text encoder of the UNet's width stand in for the
    preset's, so that a short CPU run spends its time in the UNet (and the merges) that this bench compares."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from triffusion import components
    from triffusion.export.presets import build_preset
    from triffusion.runtime import TorchRuntime

    pipe = build_preset(preset, seed)
    if light_sides:
        pipe.vae = build_preset("tiny", seed).vae
        torch.manual_seed(seed)
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=pipe.unet.config.cross_attention_dim,
                                                         num_hidden_layers=1, num_attention_heads=8,
                                                         intermediate_size=512, max_position_embeddings=77)).eval()
    wrap = lambda kind, module: TorchRuntime(components.get(kind).wrap(module), components.get(kind).input_names,
                                             components.get(kind).output_names)
    info = {"model": preset, "scheduler_config": dict(pipe.scheduler.config), "latent_channels": pipe.unet.config.in_channels,
            "vae_scale_factor": 2 ** (len(pipe.vae.config.block_out_channels) - 1),
            "vae_scaling_factor": pipe.vae.config.scaling_factor,
            "limits": {"min_size": 64, "max_size": 512, "default_height": 64, "default_width": 64}}
    return pipe, info, wrap("text_encoder", pipe.text_encoder), wrap("vae_decoder", pipe.vae)


class MergeExecutor:
    """The baseline's UNet: before each call, the adapters of the (single) request in it are merged into the
    weights, after unmerging the previous request's if they differ (fuse_lora/unfuse_lora per switch)."""

    def __init__(self, base, unet, runtime, adapters: dict):
        self.base, self.unet, self.runtime, self.adapters = base, unet, runtime, adapters
        self.current: tuple = ()
        self.merges, self.merge_seconds = 0, 0.0

    def encode(self, input_ids):
        return self.base.encode(input_ids)

    def decode(self, latent):
        return self.base.decode(latent)

    def denoise(self, model, sample, timestep, text_embeddings, adapters=None):
        from triffusion import lora

        target = tuple(adapters[0]) if adapters else ()
        if target != self.current:
            start = time.perf_counter()
            for name, scale in self.current:
                lora.merge(self.unet, self.adapters[name], -scale)
            for name, scale in target:
                lora.merge(self.unet, self.adapters[name], scale)
            self.current = target
            self.merges += 1
            self.merge_seconds += time.perf_counter() - start
        return self.runtime.run({"sample": sample, "timestep": timestep,
                                 "encoder_hidden_states": text_embeddings})["noise_pred"]


def make_trace(n: int, rate: float, adapters: int = 20, share: float = 0.8, zipf: float = 1.1, seed: int = 0):
    """(arrival offset s, adapter name or None) for n Poisson arrivals: `share` of them carry one of
    `adapters` adapters, chosen Zipf(zipf) by rank."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, adapters + 1) ** zipf
    weights /= weights.sum()
    t, trace = 0.0, []
    for _ in range(n):
        t += rng.exponential(1.0 / rate)
        name = f"style{rng.choice(adapters, p=weights):02d}" if rng.random() < share else None
        trace.append((t, name))
    return trace


def policy_hit_rate(slots: int, adapters: int = 20, requests: int = 5000, seed: int = 1) -> float:
    """The LRU's hit rate over a long trace of the same mix (plain Python, no model): the steady state that a
    short timed run, which starts cold, cannot show."""
    from triffusion.orchestrator.adapters import AdapterCache

    cache, hits, lookups = AdapterCache(slots), 0, 0
    for _, name in make_trace(requests, 1.0, adapters, seed=seed):
        if name is None:
            continue
        lookups += 1
        if cache.slot_of(name) is not None:
            hits += 1
            cache.touch(name)
        else:
            cache.reserve(name)
    return hits / lookups


def _run(engine, admit, trace, steps: int, slo_s: float, scale: float = 0.8) -> dict:
    """Submit the trace in real time; the latency of each request (None if it failed) once all are answered."""
    from triffusion.orchestrator.params import GenerationParams
    from triffusion.orchestrator.request import RequestState

    answers = queue.SimpleQueue()  # one item per final answer
    sinks, ids = [], np.ones((2, 77), np.int64)
    start = time.monotonic()
    for i, (offset, name) in enumerate(trace):
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the trace's arrival times (a load generator, not a sync)
        params = GenerationParams(prompt="p", steps=steps, seed=i, slo_ms=int(slo_s * 1000),
                                  lora=((name, scale),) if name else ())
        sink = Collect(on_done=answers.put)
        sink.arrival = time.monotonic()
        sinks.append(sink)
        state = RequestState(f"r{i}", params, sink, ids, received=sink.arrival)
        try:
            admit(state)
        except Exception as exc:  # noqa: BLE001 - refused at once counts as missed
            sink.fail(exc)
    for _ in sinks:
        answers.get()
    span = max(s.done_at for s in sinks) - start
    latencies = [None if s.error is not None else s.done_at - s.arrival for s in sinks]
    met = sum(1 for x in latencies if x is not None and x <= slo_s)
    finished = [x for x in latencies if x is not None]
    return {"requests": len(trace), "met": met, "attainment": met / len(trace),
            "goodput_rps": met / span, "span_s": round(span, 2),
            "p50_s": round(float(np.percentile(finished, 50)), 3) if finished else None,
            "p99_s": round(float(np.percentile(finished, 99)), 3) if finished else None}


def bench(preset: str = "sd15-small", steps: int = 2, adapters: int = 20, rank: int = 8, requests: int = 6,
          loads: tuple = (0.25, 1.0), slo_factor: float = 4.0, slots: int = 8, seed: int = 0, log=print) -> dict:
    from safetensors.torch import save_file

    from triffusion import components, lora
    from triffusion.orchestrator.adapters import AdapterCache, AdapterExecutor, AdapterResidency
    from triffusion.orchestrator.config import OrchestratorConfig, build_engine
    from triffusion.orchestrator.executor import RuntimeExecutor
    from triffusion.runtime import TorchRuntime

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe, info, text_encoder, vae = _build(preset, seed, light_sides=True)
    base = copy.deepcopy(pipe.unet)  # the baseline's UNet (weights patched per request)
    spec = components.UNet.from_model(base)
    base_runtime = TorchRuntime(components.UNet.wrap(base), spec.input_names, spec.output_names)
    names = [f"style{i:02d}" for i in range(adapters)]
    tmp = tempfile.TemporaryDirectory(prefix="addons-")
    files, in_ram = {}, {}
    for i, name in enumerate(names):
        files[name] = Path(tmp.name) / f"{name}.safetensors"
        save_file(lora.random_state_dict(pipe.unet, rank=rank, seed=100 + i, fmt="kohya" if i % 2 else "diffusers",
                                         std=0.02), str(files[name]))
        in_ram[name] = lora.load_adapter(name, files[name], pipe.unet)  # the baseline's adapters: in host RAM
    dims = lora.target_dims(pipe.unet)
    runtime, bank = lora.lora_runtime_from_module(pipe.unet, slots=slots, max_rank=rank, per_request=1)
    log(f"{preset}: {sum(p.numel() for p in base.parameters()) / 1e6:.0f} M UNet parameters, {len(dims)} LoRA "
        f"targets; adapters rank {rank}, {in_ram[names[0]].nbytes / 2**20:.1f} MiB each; {slots} slots "
        f"({slots * bank.slot_bytes / 2**20:.0f} MiB)")

    # 1. Solo latency on the base model and the cost of one merge + unmerge: they size the SLO and the load.
    merge_s = []
    for name in names[:3]:
        start = time.perf_counter()
        lora.merge(base, in_ram[name], 0.8)
        lora.merge(base, in_ram[name], -0.8)
        merge_s.append(time.perf_counter() - start)
    config = OrchestratorConfig(admission="off", max_active=8, max_batch=16)
    plain = RuntimeExecutor(text_encoder, {"unet": base_runtime}, vae)
    engine, _ = build_engine(config, info, plain)
    engine.start()
    solo = _run(engine, engine.submit, [(0.0, None)], steps, 1e9)["p50_s"]
    solo = _run(engine, engine.submit, [(0.0, None)], steps, 1e9)["p50_s"]
    engine.stop()
    slo = slo_factor * solo
    merge_cost = float(np.median(merge_s))
    log(f"solo request ({steps} steps, 64x64): {solo:.2f} s; merge+unmerge of one adapter: {merge_cost:.2f} s; "
        f"SLO {slo:.2f} s ({slo_factor:g}x solo)")
    rates = [load / solo for load in loads]  # load 1: one arrival per solo latency

    # 2. The same traces through both systems.
    def candidate(trace):
        executor = AdapterExecutor(RuntimeExecutor(text_encoder, {}, vae), "unet", runtime, None, per_request=1)
        engine, _ = build_engine(config, info, executor)
        residency = AdapterResidency(AdapterCache(slots), lambda n: lora.load_adapter(n, files[n], dims=dims,
                                                                                        unet_config=pipe.unet.config),
                                     bank.install, engine.submit)
        executor.residency = residency
        engine.start()
        result = _run(engine, residency.admit, trace, steps, slo)
        engine.stop()
        residency.close()
        stats = residency.stats()
        result.update(hit_rate=stats["hit_rate"], loads=stats["loads"], evictions=stats["evictions"],
                      load_s_mean=round(stats["load_seconds"] / max(stats["loads"], 1), 3))
        return result

    def merging(trace):
        executor = MergeExecutor(RuntimeExecutor(text_encoder, {}, vae), base, base_runtime, in_ram)
        engine, _ = build_engine(config.replace(max_active=1), info, executor)
        engine.start()
        result = _run(engine, engine.submit, trace, steps, slo)
        engine.stop()
        result.update(merges=executor.merges, merge_s_total=round(executor.merge_seconds, 2))
        return result

    rows = []
    for i, rate in enumerate(rates):
        trace = make_trace(requests, rate, adapters, seed=seed)
        # the two systems one after the other on the same trace, in alternating order (the CPU is shared)
        first, second = (("candidate", candidate), ("merge", merging))[:: 1 if i % 2 == 0 else -1]
        row = {"rate_rps": round(rate, 4), "order": [first[0], second[0]]}
        row[first[0]] = first[1](trace)
        row[second[0]] = second[1](trace)
        rows.append(row)
        c, m = row["candidate"], row["merge"]
        log(f"rate {rate:.3f}/s: candidate goodput {c['goodput_rps']:.3f}/s ({c['attainment']:.0%} in SLO, p99 "
            f"{c['p99_s']} s, hit rate {c['hit_rate']:.2f}) | merge baseline {m['goodput_rps']:.3f}/s "
            f"({m['attainment']:.0%} in SLO, p99 {m['p99_s']} s, {m['merges']} merges)")
    tmp.cleanup()

    def at_99(system):  # the best goodput over the loads at which >= 99% met the SLO
        ok = [r[system]["goodput_rps"] for r in rows if r[system]["attainment"] >= 0.99]
        return max(ok) if ok else 0.0

    cand, merge = at_99("candidate"), at_99("merge")
    hits = [r["candidate"]["hit_rate"] for r in rows if r["candidate"]["hit_rate"] is not None]
    return {"preset": preset, "unet_parameters_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
            "lora_targets": len(dims), "adapters": adapters, "rank": rank, "slots": slots, "steps": steps,
            "size": "64x64", "solo_s": round(solo, 3), "merge_unmerge_s": round(merge_cost, 3), "slo_s": round(slo, 3),
            "requests_per_rate": requests, "rows": rows, "goodput_at_99_candidate": cand, "goodput_at_99_merge": merge,
            # None when the merge baseline met the 99% SLO at none of the loads (no finite ratio to report)
            "goodput_ratio_vs_merge": (cand / merge) if merge else None,
            "goodput_ratio_at_each_load": [round(r["candidate"]["goodput_rps"] / r["merge"]["goodput_rps"], 2)
                                           if r["merge"]["goodput_rps"] else None for r in rows],
            "hit_rate": float(np.mean(hits)) if hits else None,  # measured in the timed runs (they start cold)
            "hit_rate_steady_state": round(policy_hit_rate(slots, adapters), 3)}


def lora_parity(preset: str = "tiny", steps: int = 6, log=print) -> dict:
    """A batch of three adapters and none through the engine's adapter path against each request served alone on
    a UNet with its adapter merged into the weights (in process: the server test does it through tritonserver)."""
    from triffusion import components, lora
    from triffusion.orchestrator.adapters import AdapterCache, AdapterExecutor, AdapterResidency
    from triffusion.orchestrator.config import OrchestratorConfig, build_engine
    from triffusion.orchestrator.executor import RuntimeExecutor
    from triffusion.orchestrator.params import GenerationParams
    from triffusion.orchestrator.request import RequestState
    from triffusion.runtime import TorchRuntime

    pipe, info, text_encoder, vae = _build(preset)
    original = copy.deepcopy(pipe.unet)
    adapters = {f"a{i}": lora.normalize(f"a{i}", lora.random_state_dict(pipe.unet, rank=4, seed=i, std=0.15,
                                                                        alpha=4.0), pipe.unet) for i in range(3)}
    mix = [(("a0", 0.8),), (("a1", 1.0),), (("a2", 0.6), ("a0", -0.4)), ()]
    ids = np.ones((2, 77), np.int64)
    ids[:, 1:4] = [[10, 11, 12], [20, 21, 22]]

    def serve(executor, mixes, admit_with=None):
        engine, _ = build_engine(OrchestratorConfig(admission="off"), info, executor)
        states = [RequestState(f"p{i}", GenerationParams(prompt="p", steps=steps, seed=7, lora=pairs), Collect(), ids)
                  for i, pairs in enumerate(mixes)]
        drain(engine, states, None if admit_with is None else (lambda state: admit_with(engine, state)))
        return [s.sink.image for s in states], engine

    runtime, bank = lora.lora_runtime_from_module(pipe.unet, slots=3, max_rank=4, per_request=2)
    for slot, adapter in enumerate(adapters.values(), start=1):
        bank.install(slot, adapter)
    residency = AdapterResidency(AdapterCache(3), adapters.__getitem__, bank.install)
    for name in adapters:
        residency.cache.reserve(name)
    executor = AdapterExecutor(RuntimeExecutor(text_encoder, {}, vae), "unet", runtime, residency, per_request=2)

    def admit(engine, state):
        residency.connect(engine.submit)
        residency.admit(state)

    batched, _ = serve(executor, mix, admit)
    worst = []
    for pairs, image in zip(mix, batched):
        unet = copy.deepcopy(original)
        for name, scale in pairs:
            lora.merge(unet, adapters[name], scale)
        spec = components.UNet.from_model(unet)
        fused = RuntimeExecutor(text_encoder, {"unet": TorchRuntime(components.UNet.wrap(unet), spec.input_names,
                                                                    spec.output_names)}, vae)
        (expected,), _ = serve(fused, [()])
        worst.append(image_diff(image, expected))
    effect = min(image_diff(image, batched[-1]) for image in batched[:-1])
    ok = max(worst) <= PARITY_TOLERANCE and effect > 10 * PARITY_TOLERANCE
    log(f"lora parity ({preset}, {steps} steps): batched vs fused solo max {worst} uint8 levels (tolerance "
        f"{PARITY_TOLERANCE}); smallest adapter effect {effect}: {'ok' if ok else 'FAILED'}")
    return {"ok": ok, "max_diff": worst, "tolerance": PARITY_TOLERANCE, "adapter_effect_min": effect}


def controlnet_parity():
    """The ControlNet helper's parity check (perf/addons_controlnet.py), or None when it is not there."""
    try:
        from perf.addons_controlnet import controlnet_parity as check
    except ImportError:
        return None
    return bool(check())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.addons", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15-small", help="the UNet architecture (seeded random weights)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--requests", type=int, default=6, help="requests per load level")
    p.add_argument("--loads", default="0.25,1", help="comma-separated loads: arrivals per solo request latency")
    p.add_argument("--slots", type=int, default=8, help="adapter slots (the cache: slots x slot size in MiB)")
    p.add_argument("--slo-factor", type=float, default=4.0, help="SLO as a multiple of a solo request's latency")
    p.add_argument("--no-controlnet", action="store_true", help="skip the ControlNet parity check")
    p.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(RESULTS.parents[2])}")
    args = p.parse_args(argv)
    started = time.perf_counter()
    parity = lora_parity()
    result = bench(args.preset, steps=args.steps, requests=args.requests, slots=args.slots, slo_factor=args.slo_factor,
                   loads=tuple(float(r) for r in args.loads.split(",") if r))
    control = None if args.no_controlnet else controlnet_parity()
    from perf.slo_proof import commit

    out = {"bench": "addons", "commit": commit(), "goodput_ratio_vs_merge": result["goodput_ratio_vs_merge"],
           "lora_parity_ok": parity["ok"], "controlnet_parity_ok": control, "hit_rate": result["hit_rate"],
           "command": "python -m perf.addons " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads (shared CPU)",
           "policy": "a request whose adapter is not resident waits outside the engine while it loads; others step",
           "lora_parity": parity, **result, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({k: out[k] for k in ("goodput_ratio_vs_merge", "lora_parity_ok", "controlnet_parity_ok",
                                          "hit_rate")}))
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
