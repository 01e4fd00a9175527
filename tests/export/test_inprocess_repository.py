"""With the UNet in the orchestrator, the UNet models hold no second copy of the weights or graphs: they
are CPU models that load nothing, while the text encoder and VAE stay GPU models with their graphs."""

import json

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triffusion import contract
from triffusion.export.repository import write_repository
from triffusion.runtime import InOrchestrator


def parameters(repo, model):
    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return config.instance_group[0].kind, {k: v.string_value for k, v in config.parameters.items()}


def torch_gpu_pipeline(info: dict) -> dict:
    """The tiny export as a torch CUDA export with a light variant describes itself (graphs per model)."""
    variant = "unet_tiny_lite"
    artifacts = {**info["artifacts"], variant: f"{variant}/1/torch"}
    graphs = {name: "1x8x8,2x8x8" for name in artifacts}
    return {**info, "artifacts": artifacts, "unets": {"default": contract.UNET, "light": variant}, "graphs": graphs}


def test_torch_on_cuda_serves_the_unets_in_the_orchestrator_only(tiny_build, tmp_path):
    _, _, info = tiny_build
    pipeline = torch_gpu_pipeline(info)
    write_repository(tmp_path, pipeline, runtime="torch", device="cuda")
    kind = model_config_pb2.ModelInstanceGroup
    for unet in (contract.UNET, "unet_tiny_lite"):
        group, params = parameters(tmp_path, unet)
        assert group == kind.KIND_CPU and params["runtime"] == InOrchestrator.KIND and "graph_shapes" not in params
    for component in (contract.TEXT_ENCODER, contract.VAE_DECODER):
        group, params = parameters(tmp_path, component)
        assert group == kind.KIND_GPU and params["graph_shapes"] and params["runtime"] == "torch"
    _, orchestrator = parameters(tmp_path, contract.ORCHESTRATOR)
    assert orchestrator["unet_executor"] == "inprocess"
    assert json.loads((tmp_path / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())["graphs"][contract.UNET]


def test_over_bls_the_unets_are_served_models_again(tiny_build, tmp_path):
    _, _, info = tiny_build
    write_repository(tmp_path, torch_gpu_pipeline(info), runtime="torch", device="cuda",
                     orchestrator={"unet_executor": "bls"})
    group, params = parameters(tmp_path, contract.UNET)
    assert group == model_config_pb2.ModelInstanceGroup.KIND_GPU and params["graph_shapes"] == "1x8x8,2x8x8"


def test_on_the_cpu_the_in_process_unets_stay_callable_models(tiny_build, tmp_path):
    _, _, info = tiny_build
    write_repository(tmp_path, torch_gpu_pipeline(info), runtime="torch", device="cpu",
                     orchestrator={"unet_executor": "inprocess", "runtime": "torch", "device": "cpu"})
    group, params = parameters(tmp_path, contract.UNET)
    assert group == model_config_pb2.ModelInstanceGroup.KIND_CPU and params["runtime"] == "torch"
