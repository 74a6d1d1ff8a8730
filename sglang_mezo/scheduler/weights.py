"""SGLang's served weights as pieces of Hugging Face checkpoint tensors.

z must be keyed by the checkpoint, not by SGLang's layout: a served element is perturbed with the z of the same
element in the HF checkpoint (its tensor name and index there), so a trajectory trained at any TP degree replays
onto the plain checkpoint. This module undoes SGLang's layout for Llama/Qwen2-style models (SGLang 0.5.23):

* ``qkv_proj`` (QKVParallelLinear) holds, on each TP rank, rows [q | k | v] of ``q_proj``/``k_proj``/``v_proj``;
  when there are fewer KV heads than ranks, each KV head is replicated on several ranks (same z on each copy).
* ``gate_up_proj`` (MergedColumnParallelLinear) holds rows [gate | up].
* ``o_proj``/``down_proj`` (RowParallelLinear) are split along the input dimension (a column offset).
* ``embed_tokens``/``lm_head`` (VocabParallelEmbedding) hold a row range of the vocabulary, padded: padding rows
  are not part of any checkpoint tensor and are never perturbed. A tied ``lm_head`` is the embedding itself.
* On a CPU, a TP degree that does not divide the head counts makes SGLang *pad* the heads (zero heads appended
  after the real ones; the real counts stay in ``hf_config.original_num_attention_heads`` and
  ``original_total_num_kv_heads``), and the MLP width (``original_intermediate_size``): padded q/k/v and
  gate/up rows and o_proj/down_proj columns are not in the checkpoint either.
* Everything else (norms, row-parallel biases) is replicated whole on every rank.
* With ``--enable-lora``, SGLang wraps each LoRA target module (``QKVParallelLinearWithLoRA`` and so on): the
  layer itself is the wrapper's ``base_layer`` (its parameters may be named through it, one level deeper).
"""

from __future__ import annotations

import torch

from sglang_mezo.core.params import TrainablePiece

_ROW_PARALLEL = ("o_proj", "down_proj")
_VOCAB = ("embed_tokens", "lm_head")


def _piece(name: str, data: torch.Tensor, full_shape: tuple[int, ...], offset: int) -> TrainablePiece:
    """A piece whose local block starts ``offset`` rows into its full tensor (elements, for 1-D tensors)."""
    if len(full_shape) == 1:
        return TrainablePiece(name, data, full_shape, col_offset=offset)
    return TrainablePiece(name, data, full_shape, row_offset=offset)


def _real(local: int, global_start: int, real_total: int) -> int:
    """How many of a shard's ``local`` rows (or columns), starting at ``global_start``, exist in the checkpoint."""
    return max(0, min(local, real_total - global_start))


def _qkv_pieces(prefix: str, kind: str, param: torch.Tensor, layer, tp_rank: int,
                heads: int, kv_heads: int) -> list[TrainablePiece]:
    head = layer.head_size
    v_head = getattr(layer, "v_head_size", head)
    q_rows = layer.num_heads * head
    kv_rows = layer.num_kv_heads * head
    v_rows = layer.num_kv_heads * v_head
    tail = tuple(param.shape[1:])
    kv_rank = tp_rank // layer.num_kv_head_replicas
    spans = [  # (checkpoint tensor, local first row, local rows, checkpoint rows, global first row)
        ("q_proj", 0, q_rows, heads * head, tp_rank * q_rows),
        ("k_proj", q_rows, kv_rows, kv_heads * head, kv_rank * kv_rows),
        ("v_proj", q_rows + kv_rows, v_rows, kv_heads * v_head, kv_rank * v_rows),
    ]
    return [
        _piece(f"{prefix}.{hf}.{kind}", param[start : start + _real(rows, offset, full_rows)], (full_rows, *tail),
               offset)
        for hf, start, rows, full_rows, offset in spans
    ]


def _gate_up_pieces(prefix: str, kind: str, param: torch.Tensor, tp_rank: int, tp_size: int,
                    intermediate: int | None) -> list[TrainablePiece]:
    rows = param.shape[0] // 2
    full_rows = intermediate or rows * tp_size
    real = _real(rows, tp_rank * rows, full_rows)
    tail = tuple(param.shape[1:])
    return [
        _piece(f"{prefix}.{hf}.{kind}", param[i * rows : i * rows + real], (full_rows, *tail), tp_rank * rows)
        for i, hf in enumerate(("gate_proj", "up_proj"))
    ]


def _base(module: torch.nn.Module) -> torch.nn.Module:
    """The layer itself, under a LoRA wrapper if there is one."""
    return getattr(module, "base_layer", module)


def served_pieces(model: torch.nn.Module, tp_rank: int = 0, tp_size: int = 1, *, hf_config=None) -> list[TrainablePiece]:
    """Every served parameter of ``model`` (an SGLang Llama/Qwen2-style model on TP rank ``tp_rank``) as pieces of
    HF checkpoint tensors. ``hf_config`` (SGLang's, after its TP adjustments) gives the checkpoint's real head
    counts when SGLang padded them. Raises ValueError for a parameter whose layout it does not know."""
    pieces: list[TrainablePiece] = []
    modules = dict(model.named_modules())
    heads = getattr(hf_config, "original_num_attention_heads", None) or getattr(hf_config, "num_attention_heads", 0)
    kv_heads = getattr(hf_config, "original_total_num_kv_heads", None) or getattr(
        hf_config, "num_key_value_heads", None) or heads
    # SGLang on CPU pads the MLP width to a multiple of tp * 32 and keeps the real one here
    intermediate = getattr(hf_config, "original_intermediate_size", None) or getattr(
        hf_config, "intermediate_size", None)
    for name, param in model.named_parameters():
        data = param.detach()
        module_name, kind = name.rsplit(".", 1)
        if module_name.endswith(".base_layer"):  # a LoRA wrapper's base layer: the checkpoint's name is one up
            module_name = module_name.removesuffix(".base_layer")
            name = f"{module_name}.{kind}"
        module = _base(modules[module_name])
        prefix, _, leaf = module_name.rpartition(".")
        if leaf == "qkv_proj":
            pieces += _qkv_pieces(prefix, kind, data, module, tp_rank, heads or module.total_num_heads,
                                  kv_heads or module.total_num_kv_heads)
        elif leaf == "gate_up_proj":
            pieces += _gate_up_pieces(prefix, kind, data, tp_rank, tp_size, intermediate)
        elif leaf in _ROW_PARALLEL and kind == "weight":
            cols = data.shape[1]
            full_cols = cols * tp_size
            if leaf == "o_proj" and heads:  # padded heads add zero input columns at the end
                full_cols = heads * _base(modules[f"{prefix}.qkv_proj"]).head_size
            elif leaf == "down_proj" and intermediate:  # so does a padded MLP width
                full_cols = intermediate
            start = tp_rank * cols
            pieces.append(TrainablePiece(name, data[:, : _real(cols, start, full_cols)], (data.shape[0], full_cols),
                                         col_offset=start))
        elif leaf in _VOCAB:
            indices = module.shard_indices
            start, end = indices.org_vocab_start_index, indices.org_vocab_end_index
            pieces.append(TrainablePiece(name, data[: end - start], (module.org_vocab_size, *data.shape[1:]),
                                         row_offset=start))
        elif data.dim() <= 1 or leaf.endswith("norm") or leaf in _ROW_PARALLEL:
            pieces.append(TrainablePiece(name, data, tuple(data.shape)))
        else:
            raise ValueError(f"sglang-mezo does not know how SGLang lays out parameter {name!r} ({type(module).__name__})")
    return pieces
