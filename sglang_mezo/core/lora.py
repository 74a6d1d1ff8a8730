"""A LoRA adapter as MeZO trains it: its definition, its tensors under PEFT's names, and its deterministic start.

The adapter's tensors are keyed by the names PEFT writes in ``adapter_model.safetensors``
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``, [r, in]; ``…lora_B.weight``, [out, r]) at the
adapter's own rank: z is keyed by these names, so a trajectory trained in any engine's layout (SGLang's stacked,
rank-padded LoRA pool) replays onto a PEFT copy of the adapter anywhere. PEFT computes W x + (α/r)·B(A x).

A fresh adapter starts as PEFT's does in distribution (B = 0; A with the variance of PEFT's Kaiming-uniform
initialisation, 1/(3·in)), but from a seed rather than a generator's state: A = z(seed)/√(3·in) with this
project's own z, which is bit-identical on every device, so the start of every trajectory is reproducible.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_mezo.kernels import ZKind, ZSlice, check_seed, derive_seed, materialize_z, tensor_key

from .params import TrainablePiece, TrainableSet
from .probes import replay_updates
from .trajectory import Trajectory

PEFT_PREFIX = "base_model.model.model.layers"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTENTION + MLP
_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a Llama/Qwen2-style decoder that a LoRA adapter's shapes depend on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def of(cls, config) -> ModelDims:
        """From a Hugging Face config (or anything with its attribute names)."""
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(hidden=int(config.hidden_size), intermediate=int(config.intermediate_size), heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
                   layers=int(config.num_hidden_layers))

    def in_out(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[module]


@dataclass(frozen=True)
class LoraSpec:
    """What an adapter is: rank r, scale α (PEFT's ``lora_alpha``: the forward adds (α/r)·B A x), the modules it
    adapts in every layer, and the seed of its A at the start."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        unknown = sorted(set(self.target_modules) - set(MODULES))
        if unknown or not self.target_modules:
            raise ValueError(f"target modules must be among {', '.join(MODULES)}; got {list(self.target_modules)}")
        object.__setattr__(self, "target_modules", tuple(m for m in MODULES if m in self.target_modules))
        check_seed(self.init_seed)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, base_model: str = "") -> dict:
        """PEFT's ``adapter_config.json`` for this adapter (also what SGLang's loader reads)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "target_modules": list(self.target_modules), "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                "base_model_name_or_path": base_model, "inference_mode": True}

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules),
                "init_seed": self.init_seed}

    @classmethod
    def from_dict(cls, data: dict) -> LoraSpec:
        return cls(rank=int(data["rank"]), alpha=float(data["alpha"]), target_modules=tuple(data["target_modules"]),
                   init_seed=int(data.get("init_seed", 0)))

    @classmethod
    def from_peft_config(cls, config: dict, init_seed: int = 0) -> LoraSpec:
        """The spec of a PEFT adapter folder's ``adapter_config.json`` (a list of module names or PEFT's
        ``all-linear``)."""
        targets = config.get("target_modules") or ()
        if isinstance(targets, str):
            targets = MODULES if targets == "all-linear" else (targets,)
        return cls(rank=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
                   target_modules=tuple(targets), init_seed=init_seed)


def peft_name(layer: int, module: str, part: str) -> str:
    """PEFT's tensor name of ``part`` (``lora_A`` or ``lora_B``) of ``module`` in ``layer``."""
    block = "self_attn" if module in ATTENTION else "mlp"
    return f"{PEFT_PREFIX}.{layer}.{block}.{module}.{part}.weight"


def parse_peft_name(name: str) -> tuple[int, str, str]:
    """(layer, module, part) of a PEFT LoRA tensor name; ValueError for another name."""
    match = _NAME.match(name)
    if match is None or match.group(3) not in MODULES:
        raise ValueError(f"not a PEFT LoRA tensor of a Llama-style decoder: {name!r}")
    return int(match.group(1)), match.group(3), match.group(4)


def peft_manifest(dims: ModelDims, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    """Every tensor of the adapter, by PEFT name, with its shape, in PEFT's order (layer, module, A then B)."""
    out: dict[str, tuple[int, int]] = {}
    for layer in range(dims.layers):
        for module in spec.target_modules:
            fan_in, fan_out = dims.in_out(module)
            out[peft_name(layer, module, "lora_A")] = (spec.rank, fan_in)
            out[peft_name(layer, module, "lora_B")] = (fan_out, spec.rank)
    return out


def initial_weights(dims: ModelDims, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """A fresh adapter's fp32 tensors: B = 0, A = z(seed_A)/√(3·in), z Gaussian and keyed like a step's (each A
    draws from a seed derived from the spec's ``init_seed`` and its layer, module index as probe index)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in peft_manifest(dims, spec).items():
        layer, module, part = parse_peft_name(name)
        if part == "lora_B":
            tensors[name] = torch.zeros(shape, dtype=torch.float32)
            continue
        seed = derive_seed(spec.init_seed, layer, MODULES.index(module))
        z = materialize_z(seed, ZSlice(tensor_key(name), shape[1]), shape, ZKind.GAUSSIAN)
        tensors[name] = (z.float() * (1.0 / math.sqrt(3.0 * shape[1]))).contiguous()
    return tensors


def replay_adapter(dims: ModelDims, spec: LoraSpec, records, z_kind: ZKind) -> dict[str, torch.Tensor]:
    """An adapter's fp32 tensors after ``records`` (a trajectory's steps): its seeded start, then every committed
    step's update, exactly as the scheduler's master took them."""
    tensors = initial_weights(dims, spec)
    master = TrainableSet.from_pieces([TrainablePiece(n, t, tuple(t.shape)) for n, t in tensors.items()])
    replay_updates(master, records, kind=z_kind)
    return tensors


def save_peft_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict, *,
                      dtype: torch.dtype | None = None) -> Path:
    """Write a LoRA adapter as PEFT does (``adapter_config.json`` and ``adapter_model.safetensors``), its tensors
    in ``dtype`` (default: as they are): a folder ``peft`` and SGLang's ``--lora-paths`` load."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().to(dtype or t.dtype).contiguous().cpu() for n, t in tensors.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


@dataclass(frozen=True)
class ServedAdapter:
    """A trained adapter's served version as a restart rebuilds it: the name it is served under, SGLang's LoRA id of
    that version, and its trajectory up to that version (whose header holds the spec)."""

    name: str
    lora_id: str
    trajectory: Trajectory

    @property
    def spec(self) -> LoraSpec:
        if self.trajectory.adapter is None:
            raise ValueError(f"the trajectory of adapter {self.name!r} names no adapter spec")
        return LoraSpec.from_dict(self.trajectory.adapter)

    def tensors(self, dims: ModelDims) -> dict[str, torch.Tensor]:
        return replay_adapter(dims, self.spec, self.trajectory.records, self.trajectory.z_kind)
