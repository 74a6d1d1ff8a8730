"""An adapter's PEFT tensors as views of a slot of SGLang's LoRA pool, and adapters registered from tensors.

SGLang 0.5.23 keeps, per layer L and stacked module, ``A_buffer[key][L]`` of shape (M, c·R, in) and
``B_buffer[key][L]`` of shape (M, out, R), in the model dtype (M = ``--max-loras-per-batch``, R =
``--max-lora-rank``; established on live CPU servers, see docs/adapters.md). A rank-r adapter in slot s holds PEFT's
``<part>.lora_A.weight[i, j]`` at ``A[s, k·r + i, j]`` (k the part's index in its stack) and
``<part>.lora_B.weight[o, i]`` at ``B[s, off_k + o, i]``. The LoRA layers read these buffers by reference, so a
write to a resident slot is what the next forward under that adapter computes with.

Adapters are trained at tensor-parallel size 1 for now (under TP the pool holds shards: B row-split for
column-parallel modules, A column-split for row-parallel ones); :func:`slot_tensors` refuses other layouts.
"""

from __future__ import annotations

import torch

from sglang_mezo.core.lora import LoraSpec, ModelDims, parse_peft_name

STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
"""PEFT module -> (SGLang's pool key, its index in that key's stack)."""


def loadable_refusal(spec: LoraSpec) -> str | None:
    """Why SGLang 0.5.23 cannot load an adapter of these target modules, if it cannot: it stacks q/k/v and gate/up
    on load, filling a missing k or up with zeros but failing on a missing q, v or gate."""
    targets = set(spec.target_modules)
    if targets & {"q_proj", "k_proj", "v_proj"} and not {"q_proj", "v_proj"} <= targets:
        return "SGLang loads attention adapters on q_proj and v_proj together (k_proj optional): add the missing ones"
    if "up_proj" in targets and "gate_proj" not in targets:
        return "SGLang loads up_proj adapters only together with gate_proj"
    return None


def _row_offsets(dims: ModelDims, key: str) -> tuple[int, ...]:
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    return {"qkv_proj": (0, q, q + kv, q + 2 * kv), "gate_up_proj": (0, dims.intermediate, 2 * dims.intermediate),
            "o_proj": (0, dims.hidden), "down_proj": (0, dims.hidden)}[key]


def slot_tensors(pool, dims: ModelDims, manifest: dict[str, tuple[int, int]], rank: int,
                 slot: int) -> list[torch.Tensor]:
    """The views of ``pool`` (SGLang's ``LoRAMemoryPool``) slot ``slot`` that hold each tensor of ``manifest`` (PEFT
    names and shapes, in order) of a rank-``rank`` adapter."""
    views = []
    for name, shape in manifest.items():
        layer, module, part = parse_peft_name(name)
        key, k = STACKED[module]
        if part == "lora_A":
            view = pool.A_buffer[key][layer][slot, k * rank : (k + 1) * rank, :]
        else:
            offsets = _row_offsets(dims, key)
            view = pool.B_buffer[key][layer][slot, offsets[k] : offsets[k + 1], :rank]
        if tuple(view.shape) != tuple(shape):
            raise ValueError(f"the LoRA pool holds {name} as {tuple(view.shape)}, not {tuple(shape)}: adapters train "
                             "at tensor-parallel size 1 only")
        views.append(view)
    return views


def register(manager, *, lora_id: str, name: str, spec: LoraSpec, tensors: dict[str, torch.Tensor],
             dtype: torch.dtype) -> None:
    """Load an adapter into SGLang's LoRA manager from tensors (its CPU copy, from which SGLang fills a slot
    whenever the adapter is needed and not resident), under ``lora_id``. Raises ValueError with SGLang's reason."""
    from sglang.srt.lora.lora_registry import LoRARef

    ref = LoRARef(lora_id=lora_id, lora_name=name, lora_path=f"mezo://{name}", pinned=False)
    # a copy always: SGLang may keep a tensor as given, which on a CPU in the master's dtype would be the master
    # itself, and a version must not move on with training
    cpu = {n: t.detach().to(device="cpu", dtype=dtype, copy=True) for n, t in tensors.items()}
    result = manager.load_lora_adapter_from_tensors(ref, cpu, spec.peft_config())
    if not result.success:
        raise ValueError(f"SGLang refused adapter {name!r}: {result.error_message}")


def unregister(manager, lora_id: str) -> None:
    """Drop an adapter (its CPU copy and its slot, if resident) from SGLang's LoRA manager."""
    ref = manager.lora_refs.get(lora_id)
    if ref is not None:
        manager.unload_lora_adapter(ref)


def make_resident(manager, lora_ids: list[str]) -> list[int]:
    """Put the adapters in pool slots now (loading those that are not resident from their CPU copies) and return
    their slots. Nothing evicts them until the next batch the scheduler prepares, so writes to those slots made
    before our own forward are what it computes with."""
    manager.fetch_new_loras(set(lora_ids))
    return [manager.memory_pool.uid_to_buffer_id[i] for i in lora_ids]
