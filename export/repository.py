"""Write a servable Triton model repository: config.pbtxt per model (generated from the contract),
the adapters from model_repository/, and pipeline.json for the orchestrator."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from triffusion import components, contract
from triffusion.orchestrator.config import OrchestratorConfig
from triffusion.runtime import InOrchestrator

ADAPTERS = Path(__file__).resolve().parents[1] / "model_repository"

TRITON_TYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32",
                "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL", "BYTES": "TYPE_STRING"}


def _tensors(kind: str, specs, optional: set[str] = frozenset()) -> str:
    rows = []
    for spec in specs:
        opt = " optional: true" if spec.name in optional else ""
        dims = ", ".join(str(d) for d in spec.dims)
        rows.append(f'  {{ name: "{spec.name}" data_type: {TRITON_TYPES[spec.dtype]} dims: [ {dims} ]{opt} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(params: dict) -> str:
    return "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def _instances(count: int, kind: str = "KIND_CPU") -> str:
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]\n"


def component_config(name: str, component: type[components.Component], params: dict,
                     instance_kind: str = "KIND_CPU") -> str:
    """A component served by the python backend through a triffusion runtime (onnxruntime, ...), with the
    component's tensors, optional inputs and max_batch_size (see Component.served_io)."""
    inputs, outputs = component.served_io()
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {component.max_batch}\n'
            + _tensors("input", inputs, component.optional) + _tensors("output", outputs)
            + _instances(1, instance_kind) + _parameters(params))


def orchestrator_config(params: dict) -> str:
    """Internal: only the fronts call it; every input dim is fixed."""
    optional = {s.name for s in contract.ORCHESTRATOR_INPUTS}
    return (f'name: "{contract.ORCHESTRATOR}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            + _tensors("input", contract.ORCHESTRATOR_INPUTS, optional)
            + _tensors("output", contract.ORCHESTRATOR_OUTPUTS) + _instances(1) + _parameters(params))


def front_config(name: str, max_inflight: int = 256, control: bool = False, lora: bool = False) -> str:
    """A front: the request inputs (each of shape [1]) and the responses clients read. The unary front runs
    in default mode but answers through a response sender: no request ever holds its instance. `control`:
    the pipeline serves ControlNets, so the fronts also take a control image, a ControlNet name and scale."""
    inputs = (contract.REQUEST_INPUTS + (contract.CONTROL_INPUTS if control else ())
              + (contract.LORA_INPUTS if lora else ()))  # lora: the pipeline has LoRA adapters
    optional = {s.name for s in inputs if s.name != "prompt"}
    stream = name == contract.TEXT_TO_IMAGE_STREAM
    outputs = [s for s in contract.RESPONSE_OUTPUTS if stream or s.name not in ("progress", "preview")]
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            + ("model_transaction_policy { decoupled: true }\n" if stream else "")
            + _tensors("input", inputs, optional) + _tensors("output", outputs)
            + _instances(1) + _parameters({"max_inflight": max_inflight}))


def baseline_config(name: str, pipeline_rel: str, device: str, max_batch: int, delay_us: int) -> str:
    """The baselines take the orchestrator's request inputs and answer its image and metadata outputs.
    `max_batch` 0: one request at a time; > 0: Triton's dynamic batcher groups up to that many."""
    optional = {s.name for s in contract.REQUEST_INPUTS if s.name != "prompt"}
    outputs = [s for s in contract.RESPONSE_OUTPUTS if s.name in ("image", "metadata")]
    batching = f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n" if max_batch else ""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n' + batching
            + _tensors("input", contract.REQUEST_INPUTS, optional) + _tensors("output", outputs)
            + _instances(1, "KIND_GPU" if device == "cuda" else "KIND_CPU")
            + _parameters({"pipeline": pipeline_rel, "device": device}))


def default_limits(pipeline: dict) -> dict:
    unets = sorted(pipeline.get("unets", {"default": contract.UNET}))
    if pipeline.get("cascade"):
        unets.append(contract.CASCADE)
    limits = {"size_multiple": pipeline["vae_scale_factor"] * pipeline.get("latent_multiple", 1), "unets": unets}
    classes = (pipeline.get("registry") or {}).get("slo_classes")
    if classes:
        limits["slo_classes"] = classes
    if pipeline.get("control"):  # the ControlNets a request may name
        limits["controlnets"] = sorted(pipeline["control"]["controlnets"])
    limits.update(pipeline.get("limits", {}))
    lora = pipeline.get("lora")
    if lora:  # the adapters a request may name follow pipeline.json's lora section (add-lora extends it)
        limits.update({"adapters": sorted(lora.get("adapters", {})), "max_lora": int(lora["max_per_request"]),
                       "lora_with_controlnet": bool(pipeline.get("control"))})
    return limits


def write_pipeline(out_dir: Path, pipeline: dict) -> None:
    """pipeline.json: what the orchestrator reads about the served pipeline, with its request limits."""
    served = {**pipeline, "limits": default_limits(pipeline)}
    path = Path(out_dir) / contract.ORCHESTRATOR / "1" / "pipeline.json"
    partial = path.with_name(".pipeline.json.partial")  # served repositories re-read it (add-lora): whole or old
    partial.write_text(json.dumps(served, indent=2, sort_keys=True, default=str))
    os.replace(partial, path)


def _copy_adapter(kind: str, model_dir: Path) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ADAPTERS / kind / "1" / "model.py", model_dir / "1" / "model.py")


def orchestrator_settings(pipeline: dict, runtime: str, device: str, orchestrator: dict | None) -> OrchestratorConfig:
    """The orchestrator's config: defaults, then what the served runtime implies, then the engines' limits
    recorded in pipeline.json (`engine_limits`: rows and images per call that TensorRT profiles cover, so
    that every rewrite of the repository keeps them), then explicit overrides."""
    config = OrchestratorConfig()
    if runtime == "torch" and device == "cuda":
        # Per-request state stays where the UNet runs: no BLS round trip per step (about 4 ms on an H100).
        config = config.replace(max_active=16, unet_executor="inprocess", runtime=runtime, device=device)
    return config.replace(**pipeline.get("engine_limits", {})).replace(**(orchestrator or {}))


def write_repository(out_dir: Path, pipeline: dict, *, runtime: str = "onnxruntime", device: str = "cpu",
                     orchestrator: dict | None = None, max_inflight: int = 256) -> Path:
    """Write configs and adapters around the artifacts already in `out_dir` (ONNX files, tokenizer).

    With the UNet in the orchestrator on a GPU (unet_executor inprocess, device cuda) the UNet models are
    written as CPU models that load nothing (runtime in_orchestrator): the orchestrator never calls them, and
    the weights and CUDA graph pools are then on the GPU once, in the orchestrator. On the CPU they stay
    callable models (tests compare them with the ONNX ones)."""
    out_dir = Path(out_dir)
    config = orchestrator_settings(pipeline, runtime, device, orchestrator)
    control = pipeline.get("control") or {}
    controlnets = control.get("controlnets", {}).values()
    # Where the UNet runs in the orchestrator, the controlled UNet and the ControlNets run there too.
    unets = set(pipeline.get("unets", {}).values()) | {contract.UNET} | ({contract.UNET_CONTROL, *controlnets} if control else set())
    unets_elsewhere = config.unet_executor == "inprocess" and config.device.startswith("cuda")
    graphs = pipeline.get("graphs", {})
    gpu = device == "cuda"
    cpu = {} if gpu else {"threads": str(config.threads), "spinning": config.spinning}
    for name, component in components.served(pipeline.get("unets", {}).values(), controlnets).items():
        artifact = Path(pipeline["artifacts"][name]).name
        if unets_elsewhere and name in unets:
            config_text = component_config(name, component, {"runtime": InOrchestrator.KIND, "artifact": artifact})
        else:
            params = {"runtime": runtime, "artifact": artifact, "device": device, **cpu}
            if graphs.get(name):
                params["graph_shapes"] = graphs[name]  # CUDA graphs captured per bucket at load
            if gpu:  # GPU tensors reach the model as they are (DLPack), not copied to the host first
                params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
            config_text = component_config(name, component, params, "KIND_GPU" if gpu else "KIND_CPU")
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.pbtxt").write_text(config_text)
        _copy_adapter("component", out_dir / name)
    orch_dir = out_dir / contract.ORCHESTRATOR
    _copy_adapter(contract.ORCHESTRATOR, orch_dir)
    (orch_dir / "config.pbtxt").write_text(orchestrator_config(config.to_parameters()))
    write_pipeline(out_dir, pipeline)
    if pipeline.get("gate"):  # cascades: the quality gate is a Triton model of its own
        gate_dir = out_dir / contract.QUALITY_GATE
        _copy_adapter(contract.QUALITY_GATE, gate_dir)
        (gate_dir / "config.pbtxt").write_text(component_config(
            contract.QUALITY_GATE, components.QualityGate,
            {"artifact": Path(pipeline["gate"]["artifact"]).name, "device": device, **cpu}))
    baselines = pipeline.get("baselines")
    if baselines:  # benchmarks compare against these in the same server
        for name, max_batch in ((contract.BASELINE_SEQUENTIAL, 0), (contract.BASELINE_BATCHING, baselines["max_batch"])):
            _copy_adapter("baseline", out_dir / name)
            (out_dir / name / "config.pbtxt").write_text(baseline_config(
                name, baselines["pipeline"], device, max_batch, baselines.get("delay_us", 50_000)))
    for front in contract.FRONTS:  # one adapter serves both fronts
        _copy_adapter(contract.TEXT_TO_IMAGE, out_dir / front)
        (out_dir / front / "config.pbtxt").write_text(front_config(front, max_inflight, control=bool(control),
                                                                    lora=bool(pipeline.get("lora"))))
    return out_dir
