"""Request validation: every bad field names itself and the allowed range."""

import pytest

from triffusion.orchestrator.params import InvalidRequest, Limits, parse_params

LIMITS = Limits(min_size=64, max_size=512, size_multiple=16)


def count_words(text):
    return len(text.split())


def parse(**raw):
    return parse_params({"prompt": "a red bicycle", **raw}, LIMITS, count_words)


def test_defaults_fill_missing_fields():
    p = parse()
    assert (p.height, p.width, p.steps, p.scheduler) == (64, 64, LIMITS.default_steps, "euler")
    assert 0 <= p.seed < 2**31


@pytest.mark.parametrize("raw, field, range_text", [
    ({"prompt": ""}, "prompt", "1..75 tokens"),
    ({"prompt": "   "}, "prompt", "1..75 tokens"),
    ({"prompt": "word " * 76}, "prompt", "1..75 tokens"),
    ({"negative_prompt": "word " * 80}, "negative_prompt", "1..75 tokens"),
    ({"height": 100}, "height", "multiples of 16 in 64..512"),
    ({"width": 1024}, "width", "multiples of 16 in 64..512"),
    ({"height": 48}, "height", "multiples of 16 in 64..512"),
    ({"steps": 0}, "steps", "1..100"),
    ({"steps": 101}, "steps", "1..100"),
    ({"guidance_scale": -1.0}, "guidance_scale", "0.0..20.0"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "0.0..20.0"),
    ({"scheduler": "warp"}, "scheduler", "ddim, euler"),
    ({"seed": -5}, "seed", "0.."),
])
def test_bad_field_is_named_with_its_range(raw, field, range_text):
    with pytest.raises(InvalidRequest) as info:
        parse(**raw)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ") and range_text in str(info.value)


def test_unknown_limits_key_is_named():
    with pytest.raises(ValueError, match="max_sise"):
        Limits.from_dict({"max_sise": 3})


def test_engine_sizes_restrict_resolutions_by_name():
    limits = Limits.from_dict({"min_size": 64, "max_size": 512, "size_multiple": 16, "sizes": [[64, 64], [128, 128]]})
    assert parse_params({"prompt": "a", "height": 128, "width": 128}, limits, count_words).height == 128
    with pytest.raises(InvalidRequest, match=r"height: 64x128 \(height x width\) is not served; allowed: 64x64, 128x128"):
        parse_params({"prompt": "a", "height": 64, "width": 128}, limits, count_words)
