"""LoRA adapters on a served UNet without touching its weights (the batched-LoRA approach of Punica and
S-LoRA): each targeted layer keeps the base weight and static stacked adapter slots, and a call adds
`scale[r, k] * B[slot[r, k]] @ A[slot[r, k]] @ x[r]` per row r and per adapter k of the row. Rows with
different adapters (or none: slot 0 is all zeros) share one UNet call; installing an adapter copies into a
slot in place, so CUDA graphs captured over the slot buffers need no re-capture.

Files: safetensors only (never pickle), in the diffusers/PEFT layout (`unet.<module>.lora_A.weight`,
`lora_B.weight`, optional `<module>.alpha`) or kohya's (`lora_unet_<module>.lora_down.weight`,
`lora_up.weight`, `.alpha`), which diffusers' own converters map. Served targets: the linears of the
attention and feed-forward blocks and the transformer projections (1x1 convolutions in SD1.x), which is
what these formats carry for SD1.x UNets; with `convs` (LoCon) every convolution and linear of the UNet's
blocks too (a kxk or strided convolution's down factor runs as one grouped convolution over the rows).
Text-encoder parts of a file are not applied (counted); layers that are not served are refused by name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTER_INPUTS = ("adapter_slots", "adapter_scales")  # per-row slot indices (int64) and scales (fp32), (rows, K)


class AdapterError(ValueError):
    """An adapter file that cannot be served, with a one-line reason."""


@dataclass
class Adapter:
    """One adapter, normalized: module path -> (A (rank, in), B (out, rank) with alpha/rank folded in)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source_format: str = "diffusers"
    ignored_text_encoder_keys: int = 0

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers.values())


# ---- targets ---------------------------------------------------------------------------------------
def lora_targets(unet, convs: bool = False) -> dict[str, torch.nn.Module]:
    """Served target layers: every Linear and 1x1 Conv2d inside the UNet's transformer blocks; with `convs`
    (LoCon), every Linear and Conv2d of the UNet's blocks too (resnet convolutions, time projections, up- and
    down-samplers, conv_in/conv_out)."""
    targets = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
            continue
        if convs and name != "" and not name.startswith(("time_embedding", "add_embedding")):
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                targets[name] = module
            continue
        if ".attentions." not in f".{name}":
            continue
        if isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)):
            targets[name] = module
    return targets


def _dims(module) -> tuple[int, int]:
    """(in, out) of the low-rank factors: A is (rank, in), B (out, rank); a kxk convolution's A flattens
    (in, k, k), as kohya's LoCon lora_down does."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    kh, kw = module.kernel_size
    return module.in_channels * kh * kw, module.out_channels


# ---- files -----------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; anything else (pickled .bin/.pt/.ckpt) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path.name}: only .safetensors adapter files are accepted (no pickle)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path.name}: not a readable safetensors file ({type(exc).__name__})") from None


def _kohya_layers(sd: dict, unet_config) -> tuple[dict, int]:
    """kohya's lora_unet_* names -> (module -> (down, up, alpha)), through diffusers' own converters."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    ignored = sum(1 for k in sd if k.startswith(("lora_te", "lora_te1_", "lora_te2_")))
    unet_sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    others = sorted(k for k in sd if not k.startswith(("lora_unet_", "lora_te")))
    if others:
        raise AdapterError(f"key '{others[0]}' is neither a kohya UNet nor text-encoder LoRA key")
    unet_sd = _maybe_map_sgm_blocks_to_diffusers(unet_sd, unet_config)
    layers = {}
    for key in [k for k in unet_sd if k.endswith(".lora_down.weight")]:
        stem = key[: -len(".lora_down.weight")]
        part = {key: unet_sd[key], f"{stem}.lora_up.weight": unet_sd.get(f"{stem}.lora_up.weight")}
        if part[f"{stem}.lora_up.weight"] is None:
            raise AdapterError(f"key '{stem}.lora_up.weight' is missing")
        try:
            converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(part))
        except ValueError as exc:
            raise AdapterError(f"key '{key}': diffusers cannot convert it ({exc})") from None
        peft = convert_unet_state_dict_to_peft(converted)
        down_key = next(k for k in peft if k.endswith(".lora_A.weight"))
        module = down_key[: -len(".lora_A.weight")].removeprefix("unet.")
        alpha = unet_sd.get(f"{stem}.alpha")
        layers[module] = (peft[down_key], peft[down_key.replace("lora_A", "lora_B")],
                          None if alpha is None else float(alpha))
    extra = set(unet_sd) - {k for s in (".lora_down.weight", ".lora_up.weight", ".alpha") for k in unet_sd if k.endswith(s)}
    if extra:
        raise AdapterError(f"key '{sorted(extra)[0]}' is not a LoRA down/up weight or alpha (DoRA and LoHa are not served)")
    return layers, ignored


def _diffusers_layers(sd: dict) -> tuple[dict, int]:
    """diffusers/PEFT names (unet.<module>.lora_A.weight, or the older <module>.processor.to_q_lora.down.weight)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    ignored = sum(1 for k in sd if k.startswith(("text_encoder", "te_")))
    sd = {k.removeprefix("base_model.model."): v for k, v in sd.items() if not k.startswith(("text_encoder", "te_"))}
    alphas = {k[: -len(".alpha")].removeprefix("unet."): float(v) for k, v in sd.items() if k.endswith(".alpha")}
    sd = convert_unet_state_dict_to_peft({k: v for k, v in sd.items() if not k.endswith(".alpha")})
    layers = {}
    for key, value in sd.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")].removeprefix("unet.")
            up = sd.get(key.replace(".lora_A.", ".lora_B."))
            if up is None:
                raise AdapterError(f"key '{key.replace('.lora_A.', '.lora_B.')}' is missing")
            layers[module] = (value, up, alphas.get(module))
        elif not key.endswith(".lora_B.weight"):
            raise AdapterError(f"key '{key}' is not a LoRA A/B weight or alpha (DoRA and LoHa are not served)")
    return layers, ignored


def source_format(sd: dict) -> str:
    return "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in sd) else "diffusers"


def target_dims(unet, convs: bool = False) -> dict[str, tuple[int, int]]:
    """Served target -> (in, out) features (taken before `attach` wraps the targets)."""
    return {name: _dims(module) for name, module in lora_targets(unet, convs).items()}


def normalize(name: str, sd: dict[str, torch.Tensor], unet=None, *, dims: dict | None = None,
              unet_config=None) -> Adapter:
    """A file's tensors as an Adapter for `unet` (or its target_dims and config): every layer a served target
    with matching shapes."""
    dims = dims if dims is not None else target_dims(unet)
    fmt = source_format(sd)
    if unet_config is None and unet is not None:
        unet_config = unet.config
    if fmt == "kohya" and unet_config is None:  # kohya names map to modules through the UNet's block layout
        raise ValueError("normalize: a kohya adapter needs the UNet or its config")
    raw, ignored = _kohya_layers(sd, unet_config) if fmt == "kohya" else _diffusers_layers(sd)
    if not raw:
        raise AdapterError("has no UNet LoRA layers")
    layers = {}
    for module, (down, up, alpha) in sorted(raw.items()):
        if module not in dims:
            raise AdapterError(f"layer '{module}' is not served (served: the attention, feed-forward and projection "
                               "layers of the transformer blocks)")
        in_f, out_f = dims[module]
        down, up = down.float().reshape(down.shape[0], -1), up.float().reshape(up.shape[0], -1)
        rank = down.shape[0]
        if down.shape != (rank, in_f) or up.shape != (out_f, rank):
            raise AdapterError(f"layer '{module}': shapes {tuple(down.shape)} and {tuple(up.shape)} do not fit the "
                               f"UNet's ({rank}, {in_f}) and ({out_f}, {rank})")
        factor = (alpha / rank) if alpha is not None else 1.0
        layers[module] = (down.contiguous(), (up * factor).contiguous())
    return Adapter(name, layers, fmt, ignored)


def load_adapter(name: str, path: str | Path, unet=None, *, dims: dict | None = None, convs: bool = False,
                 unet_config=None) -> Adapter:
    """An adapter file for `unet`, or for its target `dims` (a kohya file also needs the UNet's config)."""
    return normalize(name, read_state_dict(path), unet, dims=dims if dims is not None else target_dims(unet, convs),
                     unet_config=unet_config)


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """The normalized adapter in the diffusers/PEFT layout (alpha folded into B), safetensors."""
    from safetensors.torch import save_file

    tensors = {}
    for module, (down, up) in adapter.layers.items():
        tensors[f"unet.{module}.lora_A.weight"] = down.contiguous()
        tensors[f"unet.{module}.lora_B.weight"] = up.contiguous()
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")  # a served repository's loader never sees half a file
    save_file(tensors, str(partial), metadata={"format": "pt", "triffusion": json.dumps(
        {"name": adapter.name, "source_format": adapter.source_format})})
    os.replace(partial, path)
    return path


def random_state_dict(unet, rank: int = 4, seed: int = 0, fmt: str = "diffusers", std: float = 0.05,
                      alpha: float | None = None, convs: bool = False) -> dict[str, torch.Tensor]:
    """A seeded adapter over every served target (with `convs`, LoCon's: every convolution too), in the
    diffusers/PEFT or kohya layout (tests, examples, benchmarks: there is no model hub here)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, layer in lora_targets(unet, convs).items():
        in_f, out_f = _dims(layer)
        down = torch.randn(rank, in_f, generator=generator) * std
        up = torch.randn(out_f, rank, generator=generator) * std
        if isinstance(layer, torch.nn.Conv2d):  # conv factors: down (rank, in, kh, kw), up (out, rank, 1, 1)
            down, up = down.reshape(rank, layer.in_channels, *layer.kernel_size), up[..., None, None]
        if fmt == "kohya":
            stem = "lora_unet_" + module.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        elif fmt == "diffusers":
            tensors[f"unet.{module}.lora_A.weight"] = down
            tensors[f"unet.{module}.lora_B.weight"] = up
            if alpha is not None:
                tensors[f"unet.{module}.alpha"] = torch.tensor(float(alpha))
        else:
            raise ValueError(f"format '{fmt}' is unknown; choose diffusers or kohya")
    return tensors


# ---- merging (the reference, and the baseline that patches weights) ----------------------------------
@torch.no_grad()
def merge(unet, adapter: Adapter, scale: float) -> None:
    """W += scale * B @ A in place (a negative scale unmerges): what diffusers' fuse_lora computes."""
    targets = lora_targets(unet, convs=True)
    for module, (down, up) in adapter.layers.items():
        layer = targets[module]
        delta = (scale * (up @ down)).to(layer.weight.dtype)
        layer.weight += delta.reshape(layer.weight.shape)


# ---- batched application --------------------------------------------------------------------------
class SlotBank:
    """The static adapter slots of every target layer (slot 0: no adapter) and the current call's per-row
    (slots, scales). Sized once: `slots` adapters of rank up to `max_rank`, `per_request` a row."""

    def __init__(self, slots: int, max_rank: int, per_request: int):
        self.slots, self.max_rank, self.per_request = slots, max_rank, per_request
        self.layers: dict[str, "torch.nn.Module"] = {}
        self.ctx: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def slot_bytes(self) -> int:
        return sum(layer.lora_a[0].numel() * layer.lora_a.element_size()
                   + layer.lora_b[0].numel() * layer.lora_b.element_size() for layer in self.layers.values())

    @torch.no_grad()
    def install(self, slot: int, adapter: Adapter) -> None:
        """Copy an adapter into slot `slot` (1..slots), zero-padding its rank; layers it lacks are zeroed."""
        if not 1 <= slot <= self.slots:
            raise ValueError(f"slot {slot} is out of range; allowed 1..{self.slots}")
        if adapter.rank > self.max_rank:
            raise AdapterError(f"rank {adapter.rank} is above the served maximum {self.max_rank}")
        for module, layer in self.layers.items():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()
            if module in adapter.layers:
                down, up = adapter.layers[module]
                rank = down.shape[0]
                layer.lora_a[slot, :rank].copy_(down)
                layer.lora_b[slot, :, :rank].copy_(up)


def _layer_class():
    class BatchedLoRA(torch.nn.Module):
        """A target layer: the base layer's output plus the per-row low-rank deltas of the bank's context."""

        def __init__(self, base, bank: SlotBank):
            super().__init__()
            self.base = base
            self.conv = isinstance(base, torch.nn.Conv2d)
            # a kxk (or strided) convolution: the down factor is a convolution per row (grouped over rows)
            self.spatial = self.conv and (base.kernel_size != (1, 1) or base.stride != (1, 1))
            in_f, out_f = _dims(base)
            self.register_buffer("lora_a", torch.zeros(bank.slots + 1, bank.max_rank, in_f), persistent=False)
            self.register_buffer("lora_b", torch.zeros(bank.slots + 1, out_f, bank.max_rank), persistent=False)
            object.__setattr__(self, "bank", bank)  # not a submodule

        def forward(self, x, *args, **kwargs):
            y = self.base(x, *args, **kwargs)
            ctx = self.bank.ctx
            if ctx is None:
                return y
            slots, scales = ctx  # (N, K) int64, (N, K) float
            n, k = slots.shape
            if self.spatial:
                return y + self._spatial(x, slots, scales).to(y.dtype)
            h = x.flatten(2).transpose(1, 2) if self.conv else x.reshape(n, -1, x.shape[-1])  # (N, L, in)
            rank = self.lora_a.shape[1]
            a = self.lora_a[slots].reshape(n, k * rank, -1)  # (N, K*R, in)
            b = self.lora_b[slots].permute(0, 2, 1, 3).reshape(n, self.lora_b.shape[1], k * rank)  # (N, out, K*R)
            z = torch.bmm(h.to(a.dtype), a.transpose(1, 2))
            z = z * scales.to(a.dtype).repeat_interleave(rank, dim=1).unsqueeze(1)
            delta = torch.bmm(z, b.transpose(1, 2))  # (N, L, out)
            delta = delta.transpose(1, 2).reshape(y.shape) if self.conv else delta.reshape(y.shape)
            return y + delta.to(y.dtype)

        def _spatial(self, x, slots, scales):
            base, (n, k), rank = self.base, slots.shape, self.lora_a.shape[1]
            a = self.lora_a[slots].reshape(n * k * rank, base.in_channels, *base.kernel_size)
            z = torch.nn.functional.conv2d(x.reshape(1, -1, *x.shape[2:]).to(a.dtype), a, None, base.stride,
                                           base.padding, base.dilation, groups=n)  # (1, N*K*R, H', W')
            z = z.reshape(n, k * rank, *z.shape[2:]) * scales.to(a.dtype).repeat_interleave(rank, dim=1)[:, :, None, None]
            b = self.lora_b[slots].permute(0, 2, 1, 3).reshape(n, self.lora_b.shape[1], k * rank)  # (N, out, K*R)
            return torch.einsum("nrhw,nor->nohw", z, b)

    return BatchedLoRA


def attach(unet, slots: int, max_rank: int, per_request: int, convs: bool = False) -> SlotBank:
    """Wrap every served target of `unet` in place; the returned bank owns their slots."""
    bank = SlotBank(slots, max_rank, per_request)
    cls = _layer_class()
    for module in list(lora_targets(unet, convs)):
        parent_name, _, child = module.rpartition(".")
        parent = unet.get_submodule(parent_name)
        wrapped = cls(getattr(parent, child), bank)
        setattr(parent, child, wrapped)
        bank.layers[module] = wrapped
    return bank


def slot_bytes(unet, max_rank: int, dtype_bytes: int = 4, convs: bool = False) -> int:
    """Bytes one slot takes over every served target at `max_rank` (sizes the cache in MiB)."""
    return sum(max_rank * sum(_dims(m)) * dtype_bytes for m in lora_targets(unet, convs).values())


def _unet_class():
    class LoRAUNet(torch.nn.Module):
        """The UNet's serving signature plus the per-row adapter inputs. `skip_empty`: a call whose rows carry
        no adapter skips the low-rank terms (reads the slots on the host: eager CPU only, never in a graph)."""

        def __init__(self, unet, bank: SlotBank, skip_empty: bool = True):
            super().__init__()
            self.unet = unet
            object.__setattr__(self, "bank", bank)
            self.skip_empty = skip_empty
            self.layout = None  # with ControlNets: their residuals' layout (`control` below)

        def forward(self, sample, timestep, encoder_hidden_states, adapter_slots, adapter_scales, residuals=None):
            from triffusion.components import unpack_residuals

            empty = self.skip_empty and not bool((adapter_slots > 0).any())
            self.bank.ctx = None if empty else (adapter_slots.long(), adapter_scales)
            control = {} if residuals is None else unpack_residuals(self.layout, residuals, sample)
            try:
                return self.unet(sample, timestep, encoder_hidden_states, **control, return_dict=False)[0]
            finally:
                self.bank.ctx = None

    return LoRAUNet


def lora_runtime(folder: str | Path, slots: int, max_rank: int, per_request: int, device: str = "cpu",
                 graph_shapes=(), convs: bool = False):
    """(TorchRuntime, SlotBank) for a torch UNet artifact (runtime.save_torch_artifact) with `slots` adapter
    slots: inputs are the UNet's plus adapter_slots and adapter_scales (rows, per_request). CUDA graphs are
    captured over the slot buffers for the given (rows, h, w) buckets."""
    from triffusion import components

    return lora_runtime_from_module(components.UNet.load_pretrained(folder), slots, max_rank, per_request,
                                    device=device, graph_shapes=graph_shapes, convs=convs)


def lora_runtime_from_module(unet, slots: int, max_rank: int, per_request: int, device: str = "cpu",
                             graph_shapes=(), convs: bool = False):
    """lora_runtime over a UNet already loaded (wrapped in place)."""
    from triffusion import components
    from triffusion.runtime import TorchRuntime

    bank = attach(unet, slots, max_rank, per_request, convs)
    spec = components.UNet.from_model(unet)
    shapes = []
    for bucket in graph_shapes:
        inputs = spec.graph_inputs(bucket)
        inputs.update({name: (bucket[0], per_request) for name in ADAPTER_INPUTS})
        shapes.append(inputs)
    module = _unet_class()(unet, bank, skip_empty=torch.device(device).type == "cpu")
    runtime = TorchRuntime(module, spec.input_names + ADAPTER_INPUTS, spec.output_names, device=device,
                           graph_shapes=shapes, integer_inputs=components.UNet.integer_inputs() | {"adapter_slots"},
                           fp32_inputs=components.UNet.full_precision | {"adapter_scales"})
    return runtime, bank


def control_runtime(runtime, layout, device: str = "cpu"):
    """The adapter UNet of `runtime` (same module, same slots) taking a ControlNet's flattened residuals too:
    requests with adapters and control share its calls with those that have either or none. Eager (no CUDA
    graphs: the residuals' width varies with the latent size)."""
    from triffusion.runtime import TorchRuntime

    runtime.module.layout = tuple(tuple(x) for x in layout)
    return TorchRuntime(runtime.module, (*runtime.input_names, "residuals"), runtime.output_names, device=device,
                        integer_inputs=runtime.integer_inputs, fp32_inputs=runtime.fp32_inputs)


# ---- serving ------------------------------------------------------------------------------------------
def slots_for(cache_mib: float, per_slot_bytes: int, most: int = 64) -> int:
    """Adapter slots that fit in `cache_mib` MiB (at least one, at most `most`)."""
    return max(1, min(most, int(cache_mib * 2**20 // max(per_slot_bytes, 1))))


def serve(pipeline: dict, repository: str | Path, base_executor, *, observer=None, device: str = "cpu"):
    """The orchestrator's adapter path for pipeline.json's `lora` section: the adapter UNet in this process
    (torch runtime, static slots) behind an AdapterExecutor, and the residency that loads adapters off the
    engine thread. Returns (executor, residency); call residency.connect(engine.submit) once the engine exists."""
    from triffusion.orchestrator.adapters import AdapterCache, AdapterExecutor, AdapterResidency

    section = pipeline["lora"]
    repository = Path(repository)
    runtime, bank = lora_runtime(repository / section["artifact"], section["slots"], section["max_rank"],
                                 section["max_per_request"], device=device,
                                 graph_shapes=parse_shapes(pipeline.get("graphs", {}).get(section["unet"], "")),
                                 convs=bool(section.get("convs", False)))
    dims = {module: (layer.lora_a.shape[2], layer.lora_b.shape[1]) for module, layer in bank.layers.items()}
    adapters = dict(section.get("adapters", {}))  # name -> entry; `follow` updates it (add-lora while serving)

    def load(name: str) -> Adapter:
        entry = adapters.get(name)
        if entry is None:
            raise AdapterError(f"adapter {name!r} is no longer registered")
        return load_adapter(name, repository / entry["file"], dims=dims, unet_config=runtime.module.unet.config)

    residency = AdapterResidency(AdapterCache(section["slots"]), load, bank.install, observer=observer)

    def follow(entries: dict, replaced: set) -> None:
        adapters.clear()
        adapters.update(entries)
        residency.invalidate(replaced)

    residency.follow = follow  # RegisteredAdapters' on_change
    control = pipeline.get("control") or {}  # ControlNets: the controlled UNet (same weights) gets the slots too
    controlled = (control["unet"], control_runtime(runtime, control["layout"], device=device)) if control else None
    return AdapterExecutor(base_executor, section["unet"], runtime, residency, section["max_per_request"],
                           controlled=controlled), residency


def parse_shapes(spec: str):
    from triffusion.components import parse_graph_shapes

    return parse_graph_shapes(spec)
