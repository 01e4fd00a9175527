"""Build a servable repository: pipeline -> ONNX (parity-checked) -> tokenizer -> configs -> profile.

Deterministic for a seed and idempotent: a manifest records what was built from what, and a re-run
with the same inputs and intact artifacts skips the export."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from triffusion import components, contract
from triffusion.components import ServingConfig, format_graph_shapes
from triffusion.runtime import save_torch_artifact

from .onnx_export import Component, check_parity, export_component, file_sha256
from .presets import Pipeline, build_controlnet, build_unet_variant, resolve_pipeline, save_pipeline, variant_model_name
from .repository import write_pipeline, write_repository
from .tokenizer import write_tokenizer

ARTIFACTS = {name: f"{name}/1/model.onnx" for name in components.COMPONENTS}


def _fingerprint(preset, model, seed, fp16, target="embedded", sizes=None, max_unet_rows=16, variants=(),
                 random_weights=False, runtime="onnxruntime", plan_only=False) -> dict:
    import importlib.metadata

    import diffusers
    import torch

    try:  # the torch runtime needs no onnx (a GPU host's offline bundle leaves it out)
        onnx_version = importlib.metadata.version("onnx")
    except importlib.metadata.PackageNotFoundError:
        onnx_version = None
    return {"preset": preset, "model": str(Path(model).resolve()) if model and Path(model).exists() else model,
            "seed": seed, "random_weights": random_weights, "fp16": fp16,
            "target": target, "runtime": runtime, "unet_variants": list(variants),
            "sizes": sizes if target == "ngc" or runtime == "torch" else None,
            "max_unet_rows": max_unet_rows if target == "ngc" or runtime == "torch" else None,
            "plan_only": plan_only if target == "ngc" else None,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx_version}}


def _up_to_date(out: Path, fingerprint: dict) -> dict | None:
    manifest_path = out / "export_manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("fingerprint") != fingerprint:
        return None
    for name, rel in manifest["pipeline"]["artifacts"].items():
        path = out / rel
        if not path.exists() or file_sha256(path) != manifest["pipeline"]["sha256"].get(name):
            return None
    return manifest


def _pipeline_info(pipeline: Pipeline, source: str, seed: int | None, out: Path, artifacts: dict) -> dict:
    unet, vae = pipeline.unet.config, pipeline.vae.config
    large = unet.sample_size >= 64
    return {
        "model": pipeline.name, "source": source, "seed": seed,
        "latent_channels": unet.in_channels,
        "vae_scale_factor": 2 ** (len(vae.block_out_channels) - 1),
        "vae_scaling_factor": vae.scaling_factor,
        "text_hidden_size": pipeline.text_encoder.config.hidden_size,
        "vocab_size": pipeline.text_encoder.config.vocab_size,
        "latent_multiple": 2 ** (len(unet.block_out_channels) - 1),
        "scheduler_config": {k: v for k, v in dict(pipeline.scheduler.config).items()},
        "artifacts": dict(artifacts),
        "sha256": {name: file_sha256(out / rel) for name, rel in artifacts.items()},
        "limits": ({"min_size": 256, "max_size": 1024, "default_height": 512, "default_width": 512} if large else
                   {"min_size": 64, "max_size": 512, "default_height": 64, "default_width": 64}),
    }


def _measure(out: Path, info: dict, runtime: str, device: str, sizes: list[int], rows: list[int],
             artifacts: dict[str, str] | None = None) -> dict:
    """Time every UNet variant, text encoding and decoding with `runtime` on `device` (CUDA graphs included),
    in the predictor's profile format. `artifacts`: model name -> path under the model's folder, when the
    runtime reads another artifact than pipeline.json's (TensorRT engines)."""
    from triffusion.orchestrator.executor import RuntimeExecutor
    from triffusion.orchestrator.profile import profile
    from triffusion.runtime import create_runtime

    graphs = info.get("graphs", {})
    path = lambda name: out / name / artifacts[name] if artifacts else out / info["artifacts"][name]
    load = lambda name: create_runtime(runtime, path(name), device=device, graph_shapes=graphs.get(name, ""))
    unets = {name: load(name) for name in info["unets"].values()}
    executor = RuntimeExecutor(load(contract.TEXT_ENCODER), unets, load(contract.VAE_DECODER))
    data = {"unet": [], "stages": []}
    for name in unets:
        part = profile(executor, name, sizes, rows, latent_channels=info["latent_channels"],
                       vae_scale=info["vae_scale_factor"], text_hidden=info["text_hidden_size"])
        data["unet"] += part["unet"]
        data["stages"] = data["stages"] or part["stages"]
    return data


def _profile(out: Path, info: dict, runtime: str = "onnxruntime", device: str = "cpu") -> None:
    """Seed the latency predictor with times measured here, with the served runtime on the served device
    (CUDA graphs included), for every UNet variant."""
    limits = info["limits"]
    multiple = info["vae_scale_factor"] * info["latent_multiple"]
    sizes = sorted({limits["min_size"], limits["default_height"], 2 * limits["min_size"], 4 * limits["min_size"]})
    sizes = [s for s in sizes if s % multiple == 0 and s <= limits["max_size"]]
    if info.get("served_sizes"):
        sizes = info["served_sizes"]
    data = _measure(out, info, runtime, device, sizes, [1, 2, 4, 8])
    (out / contract.ORCHESTRATOR / "1" / "profile.json").write_text(json.dumps(data, indent=1) + "\n")


def _tensorrt_target(out: Path, info: dict, sizes: list[int], max_unet_rows: int, plan_only: bool, device: str,
                     log) -> ServingConfig:
    """NGC target: TensorRT engines for the components (tensorrt backend), python orchestrator and fronts.

    The orchestrator stays inside the engines' profiles: pipeline.json's `engine_limits` caps UNet rows,
    text-encoder rows and images per call at what the profiles cover (write_repository applies them on
    every rewrite). The ONNX files have FP32 inputs and outputs, as the tensorrt_plan configs declare;
    the engines run fp16 inside (BuilderFlag.FP16).

    --plan-only writes the plan and builds no engine: the components stay python models (onnxruntime over
    the ONNX files, on `device`), so the repository loads and serves while its engines are pending."""
    from .tensorrt import build_engine, plan_profiles, tensorrt_config, tensorrt_version

    serving = ServingConfig(sizes=tuple((s, s) for s in sizes), max_unet_rows=max_unet_rows,
                            opt_unet_rows=min(8, max_unet_rows), vae_scale=info["vae_scale_factor"],
                            text_hidden=info["text_hidden_size"], latent_channels=info["latent_channels"],
                            control_layout=tuple(tuple(x) for x in info.get("control", {}).get("layout", ())))
    info["limits"] = {**info["limits"], "sizes": [[s, s] for s in sizes], "min_size": min(sizes),
                      "max_size": max(sizes), "default_height": sizes[0], "default_width": sizes[0]}
    text_rows = components.TextEncoder.from_serving(serving).profile_rows(serving)[2]
    info["engine_limits"] = {"max_batch": max_unet_rows, "max_encode_rows": text_rows,
                             "max_decode_batch": serving.max_images}
    served = components.served(info.get("unets", {}).values(), info.get("control", {}).get("controlnets", {}).values())
    plan = {component: plan_profiles(served[component].name, serving) for component in info["artifacts"]}
    (out / "tensorrt_plan.json").write_text(json.dumps({c: [p.shapes for p in profiles] for c, profiles in plan.items()},
                                                       indent=1) + "\n")
    if plan_only:
        info["tensorrt"] = {"engines": "pending", "plan": "tensorrt_plan.json",
                            "note": "the components are python models until the engines are built: rerun the "
                                    "export without --plan-only where TensorRT runs (the compose export service)"}
        write_repository(out, info, device=device)
        log("engines pending (--plan-only): tensorrt_plan.json written; the components are served as python "
            f"models (onnxruntime on {device}) until an export without --plan-only builds the engines")
        return serving
    write_repository(out, info, device="cuda")
    for component, rel in info["artifacts"].items():
        build_engine(out / rel, out / component / "1" / "model.plan", plan[component], timing_cache=out / "timing.cache")
        (out / component / "config.pbtxt").write_text(tensorrt_config(served[component].name, plan[component],
                                                                      name=component))
        (out / component / "1" / "model.py").unlink(missing_ok=True)  # served by the tensorrt backend now
        log(f"{component}: TensorRT engine built")
    info["tensorrt"] = {"engines": "built", "version": tensorrt_version(), "plan": "tensorrt_plan.json"}
    write_pipeline(out, info)
    return serving


def _ngc_profile(out: Path, info: dict, serving: ServingConfig, log) -> None:
    """The latency profile of the NGC target: the built engines timed here with TensorRT where they can
    run; else (engines pending, or no GPU here) the prior of export/latency_prior.py, marked as such."""
    from .latency_prior import latency_prior

    rows = [r for r in (1, 2, 4, 8, 16) if r <= serving.max_unet_rows]
    sizes = [h for h, _ in serving.sizes]
    data, reason = None, "engines pending (--plan-only)"
    if info.get("tensorrt", {}).get("engines") == "built":
        try:
            data = _measure(out, info, "tensorrt", "cuda", sizes, rows, {n: "1/model.plan" for n in info["artifacts"]})
            data["source"] = "measured"
        except Exception as exc:  # noqa: BLE001 - the prior stands in, and says why
            reason = f"the engines could not be timed here ({type(exc).__name__}: {exc})"
            log(f"latency profile: {reason}; writing the prior")
    if data is None:
        data = latency_prior(info["parameters"], list(info["unets"].values()), sizes, rows,
                             vae_scale=info["vae_scale_factor"], max_encode_rows=info["engine_limits"]["max_encode_rows"],
                             max_images=info["engine_limits"]["max_decode_batch"])
        data["prior"]["why"] = reason
    (out / contract.ORCHESTRATOR / "1" / "profile.json").write_text(json.dumps(data, indent=1) + "\n")


def _export_onnx(kind: str, module, out: Path, name: str, pipeline: Pipeline, fp16: bool, log) -> str:
    component = Component(module, components.get(kind))
    latent = pipeline.unet.config.sample_size
    multiple = 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    other = max(multiple, (latent // 2) // multiple * multiple)
    rel = f"{name}/1/model.onnx"
    path = export_component(component, out / rel, (latent, latent), fp16=fp16)
    if not fp16:  # fp16 graphs are checked on the GPU host, where fp16 kernels exist
        error = check_parity(component, path, [(2, (latent, latent)), (1, (other, 2 * other))])
        log(f"{name}: exported, max |onnx - torch| {error:.2e}")
    return rel


def _export_torch(kind: str, module, out: Path, name: str, pipeline: Pipeline, fp16: bool, log) -> str:
    """The model's own save_pretrained folder: the torch runtime serves it with CUDA graphs per bucket."""
    import torch

    rel = f"{name}/1/torch"
    if (out / rel).exists():
        shutil.rmtree(out / rel)
    dtype = next(module.parameters()).dtype
    save_torch_artifact(kind, module.to(torch.float16) if fp16 else module, out / rel)
    module.to(dtype)
    log(f"{name}: saved for the torch runtime")
    return rel


def controlnet_model_name(name: str) -> str:
    return f"{contract.CONTROLNET}_{name}"


def _write_gate(out: Path, gate: str | None, seed: int, log) -> dict:
    """The cascade's quality gate: trained discriminator weights (orchestrator/gate.py train), CLIP
    weights (`clip:FOLDER`, `clip:HUB_ID`, or `clip:random` for tests), or a seeded random discriminator."""
    from triffusion.orchestrator.clip import ClipError
    from triffusion.orchestrator.gate import load_gate, random_gate, save_clip_gate, save_gate

    if gate and gate.startswith("clip:"):
        source, rel = gate[len("clip:"):], f"{contract.QUALITY_GATE}/1/clip"
        if not source:
            raise ValueError("--gate clip: needs a CLIP folder or hub id after 'clip:' (or clip:random)")
        try:
            save_clip_gate(source, out / rel, seed=seed)
        except ClipError as exc:
            raise ValueError(f"--gate {gate}: {exc}") from None
        log(f"{contract.QUALITY_GATE}: CLIP score gate from {source}")
        return {"artifact": rel, "kind": "clip", "trained": source != "random"}
    rel = f"{contract.QUALITY_GATE}/1/gate.pt"
    if gate:
        if Path(gate).is_dir():
            raise ValueError(f"--gate {gate} is a folder; for a CLIP score gate write --gate clip:{gate}")
        save_gate(load_gate(gate).model, out / rel, source=str(gate))  # loading it checks it
        log(f"{contract.QUALITY_GATE}: trained gate from {gate}")
    else:
        save_gate(random_gate(seed), out / rel, source="random", seed=seed)
        log(f"{contract.QUALITY_GATE}: seeded random gate (train one with python -m triffusion.orchestrator.gate)")
    return {"artifact": rel, "kind": "discriminator", "trained": bool(gate)}


def build(preset: str | None, model: str | None, out: Path, seed: int = 0, force: bool = False,
          save_pipeline_to: Path | None = None, vocab: str | None = None, fp16: bool = False,
          profile: bool = True, device: str = "cpu", target: str = "embedded", sizes: list[int] | None = None,
          max_unet_rows: int = 16, plan_only: bool = False, unet_variants: tuple[str, ...] = (),
          registry: dict | None = None, random_weights: bool = False, runtime: str = "onnxruntime",
          cascade: dict | None = None, gate: str | None = None, baselines: bool = False,
          controlnets: dict[str, str] | None = None, log=print) -> dict:
    """Export a preset or a checkpoint (real or seeded random weights, see presets.resolve_pipeline)
    into a Triton model repository at `out`."""
    if not preset and not model:
        raise SystemExit("pass --preset NAME, --model PATH, or both")
    out = Path(out)
    if runtime not in ("onnxruntime", "torch"):
        raise SystemExit(f"--runtime {runtime}: choose onnxruntime or torch")
    if runtime == "torch" and target != "embedded":
        raise SystemExit("--runtime torch serves python-backend components: use it with --target embedded")
    if target == "ngc" and max_unet_rows < 2:
        raise ValueError(f"--max-unet-rows {max_unet_rows} is out of range; allowed >= 2 (classifier-free "
                         "guidance makes two rows of a request)")
    fingerprint = _fingerprint(preset, model, seed, fp16, target, sizes, max_unet_rows, unet_variants,
                               random_weights, runtime, plan_only)
    fingerprint["registry"] = registry
    fingerprint["cascade"], fingerprint["gate"], fingerprint["baselines"] = cascade, gate, baselines
    if controlnets:  # only then: a pipeline without ControlNets keeps its fingerprint (and its up-to-date build)
        fingerprint["controlnets"] = dict(controlnets)
    if cascade and cascade["light"] not in unet_variants:
        raise SystemExit(f"--cascade {cascade['light']}: the light model must be served too; add "
                         f"--unet-variant {cascade['light']}")
    manifest = None if force else _up_to_date(out, fingerprint)
    if manifest is not None:
        log(f"{out}: up to date (export_manifest.json matches); --force rebuilds")
        if target == "embedded":  # configs are cheap: rewrite them (the device may have changed)
            write_repository(out, manifest["pipeline"], runtime=runtime, device=device)
        return manifest["pipeline"]

    started = time.perf_counter()
    # 1. The pipeline: a real checkpoint, or an architecture with seeded random weights.
    pipeline, source, random_weights = resolve_pipeline(preset, model, random_weights, seed, log=log)
    # 2. Tokenizer: the checkpoint's own, or CLIP's BPE vocabulary.
    tokenizer_dir = out / contract.ORCHESTRATOR / "1" / "tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    if pipeline.tokenizer_dir:
        shutil.copytree(pipeline.tokenizer_dir, tokenizer_dir)
    else:
        write_tokenizer(tokenizer_dir, vocab)
    # 3. One artifact per component: ONNX checked against torch at two shapes, or a torch folder.
    variants = {variant: variant_model_name(variant) for variant in unet_variants}
    modules = {contract.TEXT_ENCODER: pipeline.text_encoder, contract.UNET: pipeline.unet,
               contract.VAE_DECODER: pipeline.vae}
    # Further UNets (e.g. a light cascade partner) are Triton models of their own: unet_<preset>.
    modules.update({name: build_unet_variant(variant, pipeline, seed, random_weights)
                    for variant, name in variants.items()})
    # ControlNets: each one a model of its own, and the UNet once more, taking their residuals (unet_control).
    control_models = {name: controlnet_model_name(name) for name in controlnets or {}}
    for name, model_name in control_models.items():
        modules[model_name] = build_controlnet(controlnets[name], pipeline.unet, seed, random_weights)
    if control_models:
        modules[contract.UNET_CONTROL] = pipeline.unet
    served = components.served(variants.values(), control_models.values())  # model name -> component
    export = _export_torch if runtime == "torch" else _export_onnx
    # ngc: FP32 ONNX, as its configs declare; TensorRT runs the engines fp16 inside (--fp16 or not)
    artifact_fp16 = fp16 and target == "embedded"
    artifacts = {name: export(served[name].name, module, out, name, pipeline, artifact_fp16, log)
                 for name, module in modules.items()}
    # 4. Repository around the artifacts, the manifest, and a profile that seeds the latency predictor.
    info = _pipeline_info(pipeline, source, seed if random_weights else None, out, artifacts)
    info["random_weights"] = random_weights
    info["unets"] = {"default": contract.UNET, **variants}
    info["parameters"] = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    if control_models:
        info["control"] = {"unet": contract.UNET_CONTROL, "controlnets": control_models,
                           "sources": dict(controlnets),
                           "layout": [list(x) for x in components.residual_layout(pipeline.unet.config)]}
    if registry and registry.get("lora"):  # LoRA adapters: the UNet once more for the in-process torch runtime
        if target != "embedded":
            raise SystemExit("LoRA adapters are served by the embedded target (the torch runtime's adapter slots)")
        from .lora import enable

        enable(out, info, pipeline.unet, registry["lora"], log=log)
    if runtime == "torch":  # CUDA graphs per served bucket, captured at load
        info["served_sizes"] = sizes or [info["limits"]["default_height"]]
        serving = ServingConfig(sizes=tuple((s, s) for s in info["served_sizes"]), max_unet_rows=max_unet_rows,
                                vae_scale=info["vae_scale_factor"])
        info["graphs"] = {name: format_graph_shapes(served[name].graph_buckets(serving)) for name in artifacts}
    if cascade:
        info["cascade"] = {"light": variants[cascade["light"]], "heavy": contract.UNET,
                           "threshold": cascade.get("threshold", 0.5), "options": cascade.get("options", [])}
        info["gate"] = _write_gate(out, gate, seed, log)
    if baselines:  # a plain diffusers folder for the baseline models (perf/ compares against them)
        rel = f"{contract.BASELINE_SEQUENTIAL}/1/pipeline"
        save_pipeline(pipeline, tokenizer_dir, out / rel)
        info["baselines"] = {"pipeline": rel, "max_batch": max(1, max_unet_rows // 2)}
    if registry:  # the orchestrator reads the family's policies (entropy, cascade, SLO classes) from here
        info["registry"] = registry
    if target == "ngc":
        serving = _tensorrt_target(out, info, sizes or [info["limits"]["default_height"]], max_unet_rows, plan_only,
                                   device, log)
        if profile:
            _ngc_profile(out, info, serving, log)
    else:
        write_repository(out, info, runtime=runtime, device=device)
        if profile:
            _profile(out, info, runtime, device)
    (out / "export_manifest.json").write_text(json.dumps({"fingerprint": fingerprint, "pipeline": info},
                                                         indent=2, sort_keys=True) + "\n")
    if random_weights and preset:
        folder = save_pipeline_to or out.parent / "models" / f"{preset}-seed{seed}"
        save_pipeline(pipeline, tokenizer_dir, Path(folder))
        for model_name in control_models.values():  # ControlNetModel folders beside it (diffusers loads them)
            modules[model_name].save_pretrained(str(Path(folder) / model_name))
        log(f"diffusers folder: {folder}")
    log(f"{out}: built in {time.perf_counter() - started:.1f} s")
    return info
