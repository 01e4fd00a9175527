"""TensorRT planning and configs (plain code), and the builder's behaviour without TensorRT."""

import importlib.util

import pytest

from triffusion import components, contract
from triffusion.export.tensorrt import (OutsideProfiles, ServingConfig, TensorRTUnavailable, build_engine,
                                        check_shapes, plan_profiles, tensorrt_config)

SD15 = ServingConfig.from_dict({"sizes": [512, 768, [512, 768]], "max_unet_rows": 16, "opt_unet_rows": 8,
                                "max_images": 4})


def test_unet_gets_one_profile_per_resolution_bucket():
    profiles = plan_profiles(contract.UNET, SD15)
    assert [p.shapes["sample"] for p in profiles] == [
        ((1, 4, 64, 64), (8, 4, 64, 64), (16, 4, 64, 64)),
        ((1, 4, 96, 96), (8, 4, 96, 96), (16, 4, 96, 96)),
        ((1, 4, 64, 96), (8, 4, 64, 96), (16, 4, 64, 96)),
    ]
    assert profiles[0].shapes["encoder_hidden_states"][2] == (16, 77, 768)
    assert check_shapes(contract.UNET, profiles, {"sample": (6, 4, 96, 96), "timestep": (6,),
                                                  "encoder_hidden_states": (6, 77, 768)}) == 1


def test_shape_outside_the_profiles_is_named_with_the_served_range():
    profiles = plan_profiles(contract.UNET, SD15)
    with pytest.raises(OutsideProfiles, match=r"unet: shapes .* are outside the engine profiles .* rebuild"):
        check_shapes(contract.UNET, profiles, {"sample": (2, 4, 128, 128)})
    with pytest.raises(OutsideProfiles, match="batch"):
        check_shapes(contract.UNET, profiles, {"sample": (32, 4, 64, 64)})
    with pytest.raises(OutsideProfiles, match="not a multiple of the VAE factor 8"):
        plan_profiles(contract.UNET, ServingConfig(sizes=((500, 500),)))


def test_text_encoder_and_vae_profiles():
    assert plan_profiles(contract.TEXT_ENCODER, SD15)[0].shapes["input_ids"] == ((1, 77), (2, 77), (16, 77))
    vae = plan_profiles(contract.VAE_DECODER, SD15)
    assert len(vae) == 3 and vae[1].shapes["latent"][2] == (4, 4, 96, 96)


def test_tensorrt_config_names_platform_io_and_profiles():
    text = tensorrt_config(contract.UNET, plan_profiles(contract.UNET, SD15))
    assert 'platform: "tensorrt_plan"' in text and "kind: KIND_GPU" in text
    assert 'profile: [ "0", "1", "2" ]' in text
    for spec in components.UNet.inputs + components.UNet.outputs:
        assert f'name: "{spec.name}"' in text


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_builder_without_tensorrt_says_what_is_missing(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan", plan_profiles(contract.UNET, SD15))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installed (its wheels are not reachable from this environment)")
def test_builds_an_engine_for_the_tiny_unet(tmp_path):
    from triffusion.export.build import ARTIFACTS, build

    build("tiny", None, tmp_path / "repo", profile=False, log=lambda *_: None)
    serving = ServingConfig(sizes=((64, 64),), max_unet_rows=4, opt_unet_rows=2, text_hidden=32)
    plan = build_engine(tmp_path / "repo" / ARTIFACTS["unet"], tmp_path / "unet.plan",
                        plan_profiles(contract.UNET, serving), timing_cache=tmp_path / "cache")
    assert plan.stat().st_size > 0 and (tmp_path / "cache").exists()
