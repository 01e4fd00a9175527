"""The NGC target without TensorRT: a --plan-only repository that loads and serves (engines pending),
FP32 ONNX under --fp16, the engines' limits in the orchestrator's config, configs that Triton's own
ModelConfig proto parses, and a latency profile that is never empty."""

import json
import shutil

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from triffusion import components, contract
from triffusion.export.build import ARTIFACTS, build
from triffusion.export.repository import write_repository
from triffusion.export.tensorrt import TensorRTUnavailable, plan_profiles, tensorrt_config
from triffusion.orchestrator.config import OrchestratorConfig

SIZES = [64, 128]


def parse_config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def orchestrator_config(repo) -> OrchestratorConfig:
    config = parse_config(repo / contract.ORCHESTRATOR / "config.pbtxt")
    return OrchestratorConfig.from_parameters({k: v.string_value for k, v in config.parameters.items()})


@pytest.fixture(scope="module")
def plan_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("ngc") / "model_repository"
    build("tiny", None, out, target="ngc", sizes=SIZES, max_unet_rows=8, plan_only=True, fp16=True,
          log=lambda *_: None)
    return out


def test_plan_only_keeps_loadable_python_components_and_says_engines_are_pending(plan_only):
    for component in components.COMPONENTS:
        config = parse_config(plan_only / component / "config.pbtxt")
        assert config.backend == "python" and (plan_only / component / "1" / "model.py").exists()
        assert not (plan_only / component / "1" / "model.plan").exists()
    pipeline = json.loads((plan_only / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    assert pipeline["tensorrt"]["engines"] == "pending"
    plan = json.loads((plan_only / "tensorrt_plan.json").read_text())
    assert len(plan[contract.UNET]) == 2 and plan[contract.UNET][1]["sample"][2] == [8, 4, 16, 16]
    assert pipeline["limits"]["sizes"] == [[64, 64], [128, 128]]


def test_every_generated_config_parses_as_a_triton_model_config(plan_only):
    configs = sorted(plan_only.glob("*/config.pbtxt"))
    assert {p.parent.name for p in configs} >= {*components.COMPONENTS, contract.ORCHESTRATOR, *contract.FRONTS}
    for path in configs:
        assert parse_config(path).name == path.parent.name
    serving = components.ServingConfig(sizes=((64, 64), (128, 128)), max_unet_rows=8, text_hidden=32)
    for component in components.COMPONENTS:  # what a build with TensorRT writes for the tensorrt backend
        config = text_format.Parse(tensorrt_config(component, plan_profiles(component, serving)),
                                   model_config_pb2.ModelConfig())
        assert config.platform == "tensorrt_plan" and config.instance_group[0].kind == config.instance_group[0].KIND_GPU


def test_the_orchestrator_stays_within_the_engine_profiles_and_rewrites_keep_it(plan_only):
    serving = components.ServingConfig(sizes=((64, 64),), max_unet_rows=8)
    text_max = plan_profiles(contract.TEXT_ENCODER, serving)[0].shapes["input_ids"][2][0]
    vae_max = plan_profiles(contract.VAE_DECODER, serving)[0].shapes["latent"][2][0]
    config = orchestrator_config(plan_only)
    assert (config.max_batch, config.max_encode_rows, config.max_decode_batch) == (8, text_max, vae_max) == (8, 8, 4)
    pipeline = json.loads((plan_only / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    write_repository(plan_only, pipeline, orchestrator={"max_active": 3})  # what perf tools and tests do
    config = orchestrator_config(plan_only)
    assert (config.max_active, config.max_batch, config.max_encode_rows, config.max_decode_batch) == (3, 8, 8, 4)


def test_fp16_ngc_export_keeps_fp32_onnx_io_as_the_configs_declare(plan_only):
    for name in components.COMPONENTS:
        graph = onnx.load(str(plan_only / ARTIFACTS[name]), load_external_data=False).graph
        declared = {s.name: s.dtype for s in components.get(name).inputs + components.get(name).outputs}
        for value in list(graph.input) + list(graph.output):
            elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
            assert {"FP32": "float32", "INT64": "int64"}[declared[value.name]] == elem, (name, value.name)


def test_the_latency_profile_is_a_prior_marked_as_such_for_every_served_shape(plan_only):
    profile = json.loads((plan_only / contract.ORCHESTRATOR / "1" / "profile.json").read_text())
    assert profile["source"] == "prior" and "anchors/h100-sd15.md" in profile["prior"]["from"]
    assert "pending" in profile["prior"]["why"]
    shapes = {(m, h, rows) for m, h, w, rows, _ in profile["unet"]}
    assert shapes == {(contract.UNET, size, rows) for size in SIZES for rows in (1, 2, 4, 8)}
    assert all(seconds > 0 for *_, seconds in profile["unet"] + profile["stages"])
    assert {stage for stage, *_ in profile["stages"]} == {"encode", "decode"}


def test_a_plan_only_repository_is_not_up_to_date_for_a_build_with_engines(plan_only, tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(plan_only, repo)
    messages = []
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build("tiny", None, repo, target="ngc", sizes=SIZES, max_unet_rows=8, fp16=True, log=messages.append)
    assert not any("up to date" in m for m in messages)


def test_fewer_than_two_unet_rows_cannot_serve_guidance(tmp_path):
    with pytest.raises(ValueError, match="--max-unet-rows 1 is out of range; allowed >= 2"):
        build("tiny", None, tmp_path / "repo", target="ngc", sizes=[64], max_unet_rows=1, plan_only=True,
              profile=False, log=lambda *_: None)


@pytest.mark.server
def test_a_plan_only_repository_serves_an_image(plan_only, tmp_path):
    from triffusion.client import generate
    from triffusion.server import TritonServer, free_port

    with TritonServer(plan_only, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        server.wait_ready(timeout_s=180)
        result = generate("a lighthouse", url=server.urls["grpc"], height=128, width=128, steps=3, seed=1)
    assert result.array.shape == (128, 128, 3)


def test_with_engines_the_components_move_to_the_tensorrt_backend_and_an_untimeable_engine_gets_the_prior(
        tmp_path, monkeypatch):
    """The build path with TensorRT, its two TensorRT calls faked (TensorRT does not install here)."""
    from triffusion.export import tensorrt

    built = []

    def fake_build_engine(onnx_path, engine_path, profiles, **_):
        built.append((onnx_path.parent.parent.name, len(profiles)))
        engine_path.write_bytes(b"plan")
        return engine_path

    monkeypatch.setattr(tensorrt, "build_engine", fake_build_engine)
    monkeypatch.setattr(tensorrt, "tensorrt_version", lambda: "10.16.1.11")
    out = tmp_path / "model_repository"
    build("tiny", None, out, target="ngc", sizes=SIZES, max_unet_rows=8, log=lambda *_: None)
    assert sorted(built) == [(contract.TEXT_ENCODER, 1), (contract.UNET, 2), (contract.VAE_DECODER, 2)]
    for component in components.COMPONENTS:
        assert parse_config(out / component / "config.pbtxt").platform == "tensorrt_plan"
        assert not (out / component / "1" / "model.py").exists()
    pipeline = json.loads((out / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    assert pipeline["tensorrt"] == {"engines": "built", "version": "10.16.1.11", "plan": "tensorrt_plan.json"}
    profile = json.loads((out / contract.ORCHESTRATOR / "1" / "profile.json").read_text())
    assert profile["source"] == "prior" and "could not be timed here" in profile["prior"]["why"]
    assert (orchestrator_config(out).max_encode_rows, orchestrator_config(out).max_decode_batch) == (8, 4)
