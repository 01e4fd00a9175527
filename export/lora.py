"""LoRA adapters in a built repository: the export enables them (a registry family's `lora` section: the UNet
saved for the torch runtime beside its ONNX file, the slot bank sized from `cache_mib`), and `add-lora`
registers one more adapter in a built repository without rebuilding anything else. Adapters are stored
normalized (diffusers/PEFT layout, alpha folded in, safetensors) under orchestrator/1/adapters/; pipeline.json
`lora.adapters` lists them and the request limits (names, max per request) follow from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from triffusion import contract, lora
from triffusion.orchestrator.registry import ADAPTER_NAME
from triffusion.runtime import save_torch_artifact

from .onnx_export import file_sha256

ARTIFACT = f"{contract.UNET}/1/lora_base"  # the UNet for the torch runtime (the in-process adapter UNet)
ADAPTERS_DIR = f"{contract.ORCHESTRATOR}/1/adapters"
DEFAULTS = {"max_per_request": 3, "max_rank": 16, "cache_mib": 64, "convs": False}
MAX_SLOTS = 64


def enable(out: Path, info: dict, unet, settings: dict, log=print) -> None:
    """Save the UNet for the in-process torch runtime and write info["lora"] (the slot bank's size from
    cache_mib at max_rank), then register the settings' adapters (name -> safetensors file)."""
    adapters = dict(settings.get("adapters") or {})
    settings = {**DEFAULTS, **{k: v for k, v in settings.items() if k != "adapters"}}
    if (out / ARTIFACT).exists():
        shutil.rmtree(out / ARTIFACT)
    save_torch_artifact(contract.UNET, unet, out / ARTIFACT)
    per_slot = lora.slot_bytes(unet, settings["max_rank"], convs=bool(settings["convs"]))
    slots = lora.slots_for(settings["cache_mib"], per_slot, MAX_SLOTS)
    if slots < settings["max_per_request"]:
        raise ValueError(f"lora.cache_mib {settings['cache_mib']}: {slots} slot(s) of {per_slot / 2**20:.2f} MiB "
                         f"(rank {settings['max_rank']}) hold fewer adapters than max_per_request "
                         f"{settings['max_per_request']}; raise cache_mib")
    info["lora"] = {"unet": contract.UNET, "artifact": ARTIFACT, "slots": slots, "slot_bytes": per_slot,
                    **settings, "adapters": {}}
    log(f"lora: {slots} adapter slots of {per_slot / 2**20:.2f} MiB (rank <= {settings['max_rank']}, "
        f"{settings['cache_mib']} MiB)")
    for name, path in adapters.items():
        register(out, info, name, Path(path), unet=unet, log=log)


def register(out: Path, info: dict, name: str, path: Path, unet=None, force: bool = False, log=print) -> dict:
    """Validate an adapter file against the served UNet, store it normalized, and list it in info["lora"]."""
    section = info.get("lora")
    if not section:
        raise ValueError("this repository serves no LoRA adapters: rebuild it from a registry family with a "
                         "`lora` section (see registry.example.yaml)")
    if not ADAPTER_NAME.match(name):
        raise ValueError(f"--name {name!r}: 1..64 of letters, digits, '_', '.', '-' (no ':' or ',')")
    if name in section["adapters"] and not force:
        raise ValueError(f"--name {name}: already registered; --force replaces it")
    if unet is None:
        from triffusion import components

        unet = components.UNet.load_pretrained(out / section["artifact"])
    try:
        adapter = lora.load_adapter(name, path, unet, convs=bool(section.get("convs", False)))
    except lora.AdapterError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    if adapter.rank > section["max_rank"]:
        raise ValueError(f"{path.name}: rank {adapter.rank} is above the served max_rank {section['max_rank']}")
    rel = f"{ADAPTERS_DIR}/{name}.safetensors"
    (out / ADAPTERS_DIR).mkdir(parents=True, exist_ok=True)
    lora.save_adapter(adapter, out / rel)
    entry = {"file": rel, "rank": adapter.rank, "bytes": adapter.nbytes, "layers": len(adapter.layers),
             "source_format": adapter.source_format, "source": path.name, "sha256": file_sha256(out / rel),
             "ignored_text_encoder_keys": adapter.ignored_text_encoder_keys}
    section["adapters"][name] = entry
    log(f"lora: adapter {name} registered ({adapter.source_format}, rank {adapter.rank}, {len(adapter.layers)} layers"
        + (f"; {adapter.ignored_text_encoder_keys} text-encoder keys not applied" if adapter.ignored_text_encoder_keys
           else "") + ")")
    return entry


def add_lora(repo: Path, name: str, path: Path, force: bool = False, log=print) -> dict:
    """`add-lora`: register an adapter in a built repository; pipeline.json and the manifest follow, so a
    rebuild that finds the export up to date keeps it. A server serving the repository follows pipeline.json:
    the adapter is served from its next request, no restart (orchestrator.adapters.RegisteredAdapters)."""
    from .repository import write_pipeline

    repo = Path(repo)
    pipeline_path = repo / contract.ORCHESTRATOR / "1" / "pipeline.json"
    if not pipeline_path.exists():
        raise ValueError(f"--repo {repo}: not a built repository (no {pipeline_path.relative_to(repo)})")
    info = json.loads(pipeline_path.read_text())
    entry = register(repo, info, name, Path(path), force=force, log=log)
    info.pop("limits", None)
    manifest_path = repo / "export_manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest["pipeline"]["lora"] = info["lora"]
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        info["limits"] = manifest["pipeline"].get("limits", {})
    write_pipeline(repo, info)
    log(f"{repo}: adapter {name} added; a server serving this repository takes it from its next request"
        + ("; requests running with the old file finish with it" if force else ""))
    return entry


def make_lora(repo: Path, out: Path, rank: int = 4, seed: int = 0, fmt: str = "diffusers", std: float = 0.05,
              log=print) -> Path:
    """`make-lora`: a seeded adapter for the repository's UNet, in the diffusers/PEFT or kohya layout (an
    example file: there is no model hub here)."""
    from safetensors.torch import save_file

    from triffusion import components

    info = json.loads((Path(repo) / contract.ORCHESTRATOR / "1" / "pipeline.json").read_text())
    if not info.get("lora"):
        raise ValueError(f"--repo {repo}: serves no LoRA adapters (no lora section in pipeline.json)")
    unet = components.UNet.load_pretrained(Path(repo) / info["lora"]["artifact"])
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: write a .safetensors file")
    save_file(lora.random_state_dict(unet, rank=rank, seed=seed, fmt=fmt, std=std,
                                     convs=bool(info["lora"].get("convs", False))), str(out))
    log(f"{out}: {fmt} LoRA, rank {rank}, seed {seed}")
    return out
