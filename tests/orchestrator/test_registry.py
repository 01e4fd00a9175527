"""Registry validation: every bad key is named with what is allowed."""

from pathlib import Path

import pytest
import yaml

from triffusion.orchestrator.registry import RegistryError, load_registry, parse_registry

EXAMPLE = Path(__file__).resolve().parents[2] / "registry.example.yaml"
PRESETS = {"tiny", "tiny-lite", "sd15", "sd15-small"}


def example():
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_registry_loads():
    registry = load_registry(EXAMPLE, PRESETS)
    tiny = registry.families["tiny"]
    assert tiny.variants["light"].preset == "tiny-lite" and tiny.cascade["threshold"] == 0.5
    assert registry.families["sd15"].default == "heavy" and registry.slo_classes["interactive"]["slo_ms"] == 1500


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["families"]["tiny"]["cascade"].update(light="lite"),
     "families.tiny.cascade.light: 'lite' is not a variant of tiny; variants: heavy, light"),
    (lambda d: d["families"]["tiny"]["cascade"].update(threshold=1.5),
     "families.tiny.cascade.threshold: 1.5 is out of range; allowed 0..1"),
    (lambda d: d["families"]["tiny"]["cascade"].update(gate=3), "families.tiny.cascade.gate: expected str, got int"),
    (lambda d: d["families"]["tiny"]["variants"]["light"].update(preset="tiny-lyte"),
     "families.tiny.variants.light.preset: unknown preset 'tiny-lyte'"),
    (lambda d: d["families"]["tiny"]["variants"]["light"].update(model="/x"),
     "families.tiny.variants.light: give exactly one of preset or model"),
    (lambda d: d["families"]["tiny"].update(defualt="heavy"),
     "families.tiny.defualt: unknown key; allowed: cascade, controlnets, default, entropy, lora, styles, variants"),
    (lambda d: d["families"]["tiny"].update(default="medium"),
     "families.tiny.default: 'medium' is not a variant; variants: heavy, light"),
    (lambda d: d["slo_classes"]["batch"].update(slo_ms=0), "slo_classes.batch.slo_ms: 0 is out of range"),
    (lambda d: d["slo_classes"]["batch"].update(slo_ms="fast"), "slo_classes.batch.slo_ms: expected int, got str"),
    (lambda d: d.pop("families"), "families: missing"),
])
def test_bad_registry_names_the_key(edit, message):
    data = example()
    edit(data)
    with pytest.raises(RegistryError) as info:
        parse_registry(data, PRESETS)
    assert message in str(info.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("families: [unclosed")
    with pytest.raises(RegistryError, match=r"r\.yaml: not valid YAML"):
        load_registry(path)
