"""Declarative model registry (after SD-as-a-Service): served families, their variants (heavy, light),
cascade pairs, styles, SLO classes, and the per-model thresholds policies read. The export and the
orchestrator read the same file; a bad registry fails at load naming the offending key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class RegistryError(ValueError):
    pass


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str | None = None  # architecture preset with seeded random weights
    model: str | None = None  # or a local diffusers folder / hub id


@dataclass(frozen=True)
class Family:
    name: str
    variants: dict[str, Variant]
    default: str
    cascade: dict | None = None  # {"light": variant, "heavy": variant, "threshold": float, "gate"?: str}
    styles: tuple[str, ...] = ()
    entropy: dict = field(default_factory=dict)  # EntropyStop thresholds
    controlnets: dict = field(default_factory=dict)  # request name -> ControlNet preset or local folder
    lora: dict = field(default_factory=dict)  # LoRA: max_per_request, max_rank, cache_mib, adapters {name: file}


@dataclass(frozen=True)
class Registry:
    families: dict[str, Family]
    slo_classes: dict[str, dict]


def _require(data, key: str, kind, path: str):
    if not isinstance(data, dict) or key not in data:
        raise RegistryError(f"{path}.{key}: missing" if path else f"{key}: missing")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RegistryError(f"{path}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _only(data: dict, allowed: set[str], path: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise RegistryError(f"{path}.{sorted(unknown)[0]}: unknown key; allowed: {', '.join(sorted(allowed))}")


OPTION_KEYS = {"threshold": (0.0, 1.0), "steps": (1, 1000), "escalation": (0.0, 1.0), "quality": (0.0, None),
               "light_s": (0.0, None), "heavy_s": (0.0, None)}


def _check_options(options, path: str) -> None:
    """Controller operating points (profiled offline): every key present, every value in range."""
    if not isinstance(options, list):
        raise RegistryError(f"{path}: expected a list of operating points")
    for i, row in enumerate(options):
        where = f"{path}[{i}]"
        if not isinstance(row, dict):
            raise RegistryError(f"{where}: expected a mapping with {', '.join(OPTION_KEYS)}")
        _only(row, set(OPTION_KEYS), where)
        for key, (low, high) in OPTION_KEYS.items():
            value = _require(row, key, (int, float), where)
            if value < low or (high is not None and value > high):
                allowed = f"{low}..{high}" if high is not None else f">= {low}"
                raise RegistryError(f"{where}.{key}: {value} is out of range; allowed {allowed}")


CONTROLNET_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")


def _controlnets(section, path: str) -> dict[str, str]:
    """`controlnets: {canny: {preset: tiny-controlnet}}` (or `{model: FOLDER}`): the names requests may give.
    A name becomes part of a Triton model name (controlnet_<name>), hence the narrow alphabet."""
    if not isinstance(section, dict):
        raise RegistryError(f"{path}: expected a mapping of name -> {{preset | model}}")
    out = {}
    for name, body in section.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not CONTROLNET_NAME.match(name):
            raise RegistryError(f"{where}: a ControlNet name is 1..32 of a-z, 0-9 and _, starting with a letter or digit")
        if not isinstance(body, dict):
            raise RegistryError(f"{where}: expected a mapping with preset or model")
        _only(body, {"preset", "model"}, where)
        if ("preset" in body) == ("model" in body):
            raise RegistryError(f"{where}: give exactly one of preset or model")
        out[name] = body.get("preset") or body["model"]
    return out


LORA_KEYS = {"max_per_request": (1, 8), "max_rank": (1, 256), "cache_mib": (1, 65536)}
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # no ':' or ',': the request syntax uses them


def _lora(section, path: str) -> dict:
    """`lora: {max_per_request: 3, max_rank: 16, cache_mib: 64, convs: false, adapters: {name: file.safetensors}}`."""
    if not isinstance(section, dict):
        raise RegistryError(f"{path}: expected a mapping with {', '.join(LORA_KEYS)}, adapters")
    _only(section, set(LORA_KEYS) | {"adapters", "convs"}, path)
    if not isinstance(section.get("convs", False), bool):
        raise RegistryError(f"{path}.convs: expected true or false (true: LoCon, the convolutions carry adapters too)")
    for key, (low, high) in LORA_KEYS.items():
        if key in section:
            value = _require(section, key, int, path)
            if not low <= value <= high:
                raise RegistryError(f"{path}.{key}: {value} is out of range; allowed {low}..{high}")
    adapters = section.get("adapters", {})
    if not isinstance(adapters, dict):
        raise RegistryError(f"{path}.adapters: expected a mapping of name -> .safetensors file")
    for name, file in adapters.items():
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise RegistryError(f"{path}.adapters.{name}: an adapter name is 1..64 of letters, digits, '_', '.', '-'")
        if not isinstance(file, str) or not file.endswith(".safetensors"):
            raise RegistryError(f"{path}.adapters.{name}: expected a .safetensors file (no pickle)")
    return dict(section)


def parse_registry(data: dict, presets: set[str] | None = None) -> Registry:
    """Validate and build; `presets` (the export's preset names) checks variant presets when given."""
    if not isinstance(data, dict):
        raise RegistryError("registry: expected a mapping at the top level")
    _only(data, {"families", "slo_classes"}, "registry")
    families = {}
    for name, body in _require(data, "families", dict, "").items():
        path = f"families.{name}"
        _only(body, {"variants", "default", "cascade", "styles", "entropy", "controlnets", "lora"}, path)
        variants = {}
        for vname, vbody in _require(body, "variants", dict, path).items():
            vpath = f"{path}.variants.{vname}"
            if not isinstance(vbody, dict):
                raise RegistryError(f"{vpath}: expected a mapping with preset or model")
            _only(vbody, {"preset", "model"}, vpath)
            if ("preset" in vbody) == ("model" in vbody):
                raise RegistryError(f"{vpath}: give exactly one of preset or model")
            if presets is not None and "preset" in vbody and vbody["preset"] not in presets:
                raise RegistryError(f"{vpath}.preset: unknown preset '{vbody['preset']}'; "
                                    f"choose one of: {', '.join(sorted(presets))}")
            variants[vname] = Variant(vname, vbody.get("preset"), vbody.get("model"))
        default = body.get("default", next(iter(variants)) if variants else None)
        if default not in variants:
            raise RegistryError(f"{path}.default: '{default}' is not a variant; variants: {', '.join(variants)}")
        cascade = body.get("cascade")
        if cascade is not None:
            _only(cascade, {"light", "heavy", "threshold", "options", "gate"}, f"{path}.cascade")
            if "gate" in cascade:  # a discriminator's weights file, or clip:FOLDER / clip:HUB_ID
                _require(cascade, "gate", str, f"{path}.cascade")
            _check_options(cascade.get("options", []), f"{path}.cascade.options")
            for role in ("light", "heavy"):
                if _require(cascade, role, str, f"{path}.cascade") not in variants:
                    raise RegistryError(f"{path}.cascade.{role}: '{cascade[role]}' is not a variant of {name}; "
                                        f"variants: {', '.join(variants)}")
            threshold = _require(cascade, "threshold", (int, float), f"{path}.cascade")
            if not 0 <= threshold <= 1:
                raise RegistryError(f"{path}.cascade.threshold: {threshold} is out of range; allowed 0..1")
        entropy = body.get("entropy", {})
        _only(entropy, {"threshold", "patience", "min_fraction"}, f"{path}.entropy")
        # ControlNet presets are checked by the export (export/configs/*/controlnet.json), which builds them
        controlnets = _controlnets(body.get("controlnets", {}), f"{path}.controlnets")
        families[name] = Family(name, variants, default, cascade, tuple(body.get("styles", ())), dict(entropy),
                                controlnets, lora=_lora(body.get("lora", {}), f"{path}.lora"))
    slo_classes = data.get("slo_classes", {})
    for cname, cbody in slo_classes.items():
        cpath = f"slo_classes.{cname}"
        _only(cbody, {"slo_ms", "min_quality", "priority"}, cpath)
        slo = _require(cbody, "slo_ms", int, cpath)
        if slo <= 0:
            raise RegistryError(f"{cpath}.slo_ms: {slo} is out of range; allowed > 0")
        if "min_quality" in cbody:
            quality = _require(cbody, "min_quality", (int, float), cpath)
            if not 0 <= quality <= 1:
                raise RegistryError(f"{cpath}.min_quality: {quality} is out of range; allowed 0..1")
        if "priority" in cbody:
            priority = _require(cbody, "priority", int, cpath)
            if not 0 <= priority <= 9:
                raise RegistryError(f"{cpath}.priority: {priority} is out of range; allowed 0..9")
    return Registry(families, slo_classes)


def load_registry(path: str | Path, presets: set[str] | None = None) -> Registry:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML ({exc})") from None
    try:
        return parse_registry(data, presets)
    except RegistryError as exc:
        raise RegistryError(f"{path}: {exc}") from None
