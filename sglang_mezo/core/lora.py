"""A LoRA adapter as MeZO trains it: its definition, its tensors under PEFT's names, and its deterministic start.

The adapter's tensors are keyed by the names PEFT writes in ``adapter_model.safetensors``
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``, [r, in]; ``…lora_B.weight``, [out, r]) at the
adapter's own rank: z is keyed by these names, so a trajectory trained in any engine's layout (SGLang's stacked,
rank-padded LoRA pool) replays onto a PEFT copy of the adapter anywhere. PEFT computes W x + (α/r)·B(A x).

A fresh adapter starts as PEFT's does in distribution (B = 0; A with the variance of PEFT's Kaiming-uniform
initialisation, 1/(3·in)), but from a seed rather than a generator's state: A = z(seed)/√(3·in) with this
project's own z, which is bit-identical on every device, so the start of every trajectory is reproducible.

An adapter may instead start from another (:class:`AdapterStart`): a trained adapter, whose trajectory the spec
embeds (replay rebuilds that first, recursively along a chain of jobs, and needs nothing else), or a PEFT folder,
named by its path and the SHA-256 of its weights file (replay reads it, and refuses a folder that changed).
"""

from __future__ import annotations

import hashlib
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


PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterStart:
    """Where an adapter starts when not from its seed: exactly one of a trained adapter's ``trajectory`` (up to the
    version the job started from; its header holds that adapter's own spec and start) or a PEFT folder
    (``peft_path``, with the SHA-256 of its weights file)."""

    trajectory: Trajectory | None = None
    peft_path: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if (self.trajectory is None) == (not self.peft_path):
            raise ValueError("an adapter starts from a trained adapter's trajectory or from a PEFT folder")
        if self.trajectory is not None and self.trajectory.adapter is None:
            raise ValueError("the trajectory to start from is not an adapter's")

    @classmethod
    def of_peft_folder(cls, folder: str | Path) -> LoraSpec:
        """The spec of an adapter that starts from a PEFT folder: the folder's rank, alpha and modules, its ``start``
        the folder; ValueError for what is not one."""
        folder = Path(folder)
        try:
            config = json.loads((folder / PEFT_CONFIG).read_text())
            digest = _sha256(folder / PEFT_WEIGHTS)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a readable PEFT adapter folder ({PEFT_CONFIG}, {PEFT_WEIGHTS}): {exc}") from exc
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
            raise ValueError("only plain LoRA adapters (no DoRA, no rsLoRA) can be trained further")
        return LoraSpec.from_peft_config(config, start=cls(peft_path=str(folder.resolve()), sha256=digest))

    def weights(self, dims: ModelDims, spec: LoraSpec) -> dict[str, torch.Tensor]:
        """The start's fp32 tensors under PEFT's names, checked against ``spec``'s manifest."""
        if self.trajectory is not None:
            trained = LoraSpec.from_dict(self.trajectory.adapter)
            if not trained.same_shape(spec):
                raise ValueError(f"the trained adapter to start from is {trained.shape_text()}, not {spec.shape_text()}")
            return replay_adapter(dims, trained, self.trajectory.records, self.trajectory.z_kind)
        from safetensors.torch import load_file

        path = Path(self.peft_path) / PEFT_WEIGHTS
        if _sha256(path) != self.sha256:
            raise ValueError(f"{path} changed since the job named it (SHA-256 {self.sha256[:12]}…)")
        loaded = load_file(str(path))
        manifest = peft_manifest(dims, spec)
        if {n: tuple(t.shape) for n, t in loaded.items()} != manifest:
            extra, missing = sorted(set(loaded) - set(manifest)), sorted(set(manifest) - set(loaded))
            raise ValueError(f"{path} does not hold a {spec.shape_text()} adapter of this model's shapes (extra "
                             f"{extra[:3]}, missing {missing[:3]}, or other shapes)")
        return {name: loaded[name].float().contiguous() for name in manifest}

    def to_dict(self) -> dict:
        if self.trajectory is not None:
            return {"trajectory": self.trajectory.to_dict()}
        return {"peft_path": self.peft_path, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterStart:
        if "trajectory" in data:
            return cls(trajectory=Trajectory.from_dict(data["trajectory"]))
        return cls(peft_path=str(data["peft_path"]), sha256=str(data["sha256"]))

    def describe(self) -> str:
        if self.trajectory is not None:
            return f"a trained adapter after {self.trajectory.committed_steps} step(s)"
        return f"PEFT folder {self.peft_path}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class LoraSpec:
    """What an adapter is: rank r, scale α (PEFT's ``lora_alpha``: the forward adds (α/r)·B A x), the modules it
    adapts in every layer, and its start: the seed of A for a fresh adapter, or another adapter's weights."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    init_seed: int = 0
    start: AdapterStart | None = None
    """None: fresh, from ``init_seed``."""

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

    def same_shape(self, other: LoraSpec) -> bool:
        """The same rank, alpha and modules: the same function of the same tensors."""
        return (self.rank, self.alpha, self.target_modules) == (other.rank, other.alpha, other.target_modules)

    def shape_text(self) -> str:
        return f"rank {self.rank}, alpha {self.alpha:g}, on {', '.join(self.target_modules)}"

    def peft_config(self, base_model: str = "") -> dict:
        """PEFT's ``adapter_config.json`` for this adapter (also what SGLang's loader reads)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "target_modules": list(self.target_modules), "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                "base_model_name_or_path": base_model, "inference_mode": True}

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules),
                "init_seed": self.init_seed, **({"start": self.start.to_dict()} if self.start is not None else {})}

    @classmethod
    def from_dict(cls, data: dict) -> LoraSpec:
        return cls(rank=int(data["rank"]), alpha=float(data["alpha"]), target_modules=tuple(data["target_modules"]),
                   init_seed=int(data.get("init_seed", 0)),
                   start=AdapterStart.from_dict(data["start"]) if data.get("start") else None)

    @classmethod
    def from_peft_config(cls, config: dict, init_seed: int = 0, start: AdapterStart | None = None) -> LoraSpec:
        """The spec of a PEFT adapter folder's ``adapter_config.json`` (a list of module names or PEFT's
        ``all-linear``)."""
        targets = config.get("target_modules") or ()
        if isinstance(targets, str):
            targets = MODULES if targets == "all-linear" else (targets,)
        return cls(rank=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
                   target_modules=tuple(targets), init_seed=init_seed, start=start)


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
    """An adapter's fp32 tensors before its job's first step: its start's, or a fresh adapter's, B = 0,
    A = z(seed_A)/√(3·in), z Gaussian and keyed like a step's (each A draws from a seed derived from the spec's
    ``init_seed`` and its layer, module index as probe index)."""
    if spec.start is not None:
        return spec.start.weights(dims, spec)
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
