"""SGLang's served weights as pieces of checkpoint tensors (``sglang_mezo.scheduler.weights``), without a server:
a stand-in model with SGLang's module names, layer attributes and tensor-parallel layout (fused q/k/v and
gate/up rows, split o/down columns, vocabulary shards, replicated KV heads, and the heads, MLP width and vocabulary
SGLang pads on a CPU) is cut from a tiny Llama's checkpoint here, independently of the code under test. Every
piece must be exactly its block of the checkpoint, all ranks together must cover every checkpoint element, and no
piece may hold padding (filled with NaN)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

from sglang_mezo.scheduler.weights import served_pieces

HIDDEN = 24
HEAD = 8


class Layer(nn.Module):
    """A leaf module holding one served weight and the attributes SGLang's layer has."""

    def __init__(self, weight: torch.Tensor, **attributes) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        for name, value in attributes.items():
            setattr(self, name, value)


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` padded with NaN to ``size`` along ``dim`` (what SGLang's padding holds is not in the checkpoint)."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, float("nan"))], dim=dim)


def _rows(t: torch.Tensor, rank: int, per_rank: int) -> torch.Tensor:
    return t[rank * per_rank : (rank + 1) * per_rank]


def served_model(hf: dict[str, torch.Tensor], *, rank: int, tp: int, heads: int, kv_heads: int, inter: int,
                 vocab: int, heads_padded: int, kv_padded: int, inter_padded: int, vocab_padded: int) -> nn.Module:
    """Rank ``rank``'s SGLang model: each tensor padded as SGLang pads it, then cut as its parallel layer cuts it."""
    model = nn.Module()
    heads_per_rank = heads_padded // tp
    replicas = max(1, tp // kv_padded)
    kv_per_rank = max(1, kv_padded // tp)
    kv_rank = rank // replicas
    _put(model, "model.embed_tokens", Layer(
        _rows(_pad(hf["model.embed_tokens.weight"], vocab_padded, 0), rank, vocab_padded // tp),
        shard_indices=SimpleNamespace(org_vocab_start_index=min(vocab, rank * vocab_padded // tp),
                                      org_vocab_end_index=min(vocab, (rank + 1) * vocab_padded // tp)),
        org_vocab_size=vocab))
    _put(model, "model.norm", Layer(hf["model.norm.weight"]))
    for i in range(2):
        p = f"model.layers.{i}"
        q = _rows(_pad(hf[f"{p}.self_attn.q_proj.weight"], heads_padded * HEAD, 0), rank, heads_per_rank * HEAD)
        k, v = (_rows(_pad(hf[f"{p}.self_attn.{x}_proj.weight"], kv_padded * HEAD, 0), kv_rank, kv_per_rank * HEAD)
                for x in "kv")
        _put(model, f"{p}.self_attn.qkv_proj", Layer(
            torch.cat([q, k, v]), head_size=HEAD, num_heads=heads_per_rank, num_kv_heads=kv_per_rank,
            num_kv_head_replicas=replicas, total_num_heads=heads_padded, total_num_kv_heads=kv_padded))
        o = _pad(hf[f"{p}.self_attn.o_proj.weight"], heads_padded * HEAD, 1)
        _put(model, f"{p}.self_attn.o_proj", Layer(_rows(o.T, rank, heads_per_rank * HEAD).T))
        gate, up = (_rows(_pad(hf[f"{p}.mlp.{x}_proj.weight"], inter_padded, 0), rank, inter_padded // tp)
                    for x in ("gate", "up"))
        _put(model, f"{p}.mlp.gate_up_proj", Layer(torch.cat([gate, up])))
        down = _pad(hf[f"{p}.mlp.down_proj.weight"], inter_padded, 1)
        _put(model, f"{p}.mlp.down_proj", Layer(_rows(down.T, rank, inter_padded // tp).T))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            _put(model, f"{p}.{norm}", Layer(hf[f"{p}.{norm}.weight"]))
    return model


LAYOUTS = {
    # tp 1 and 2 with nothing padded; the KV heads (2) split across the ranks
    "tp1": dict(tp=1, heads=3, kv_heads=1, inter=40, vocab=60, heads_padded=3, kv_padded=1, inter_padded=40,
                vocab_padded=64),
    # tp 2 on a CPU: 3 heads and 1 KV head padded to 4 and 2, the MLP width 40 to 64, the vocabulary 60 to 64
    "tp2-padded": dict(tp=2, heads=3, kv_heads=1, inter=40, vocab=60, heads_padded=4, kv_padded=2, inter_padded=64,
                       vocab_padded=64),
    # tp 2 with one KV head replicated on both ranks (the same z on both copies)
    "tp2-replicated": dict(tp=2, heads=4, kv_heads=1, inter=48, vocab=60, heads_padded=4, kv_padded=1,
                           inter_padded=48, vocab_padded=64),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_piece_is_its_block_of_the_checkpoint_and_together_they_cover_it(layout):
    shape = LAYOUTS[layout]
    heads, kv_heads, inter, vocab = shape["heads"], shape["kv_heads"], shape["inter"], shape["vocab"]
    hf = tiny_llama(seed=2, hidden_size=HIDDEN, head_dim=HEAD, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    intermediate_size=inter, vocab_size=vocab).state_dict()
    hf_config = SimpleNamespace(num_attention_heads=shape["heads_padded"], original_num_attention_heads=heads,
                                original_total_num_kv_heads=kv_heads, intermediate_size=shape["inter_padded"],
                                original_intermediate_size=inter)
    covered = {name: torch.zeros_like(t, dtype=torch.int64) for name, t in hf.items() if name != "lm_head.weight"}
    for rank in range(shape["tp"]):
        model = served_model(hf, rank=rank, **shape)
        for piece in served_pieces(model, rank, shape["tp"], hf_config=hf_config):
            full = hf[piece.name]
            assert piece.full_shape == tuple(full.shape), piece.name
            view = full.view(-1, full.shape[-1]) if full.dim() > 1 else full.view(1, -1)
            block = piece.data if piece.data.dim() > 1 else piece.data.view(1, -1)
            rows = slice(piece.row_offset, piece.row_offset + block.shape[0])
            cols = slice(piece.col_offset, piece.col_offset + block.shape[1])
            assert torch.equal(block, view[rows, cols]), (layout, rank, piece.name)  # NaN padding never equals
            covered[piece.name].view(view.shape)[rows, cols] += 1
    kv_copies = max(1, shape["tp"] // shape["kv_padded"])
    for name, count in covered.items():  # norms are whole on every rank; a replicated KV head on several
        kv = name.endswith(("k_proj.weight", "v_proj.weight"))
        expected = shape["tp"] if "norm" in name else kv_copies if kv else 1
        assert (count == expected).all(), (layout, name, count.unique())


def test_an_unknown_layout_is_refused():
    model = nn.Module()
    _put(model, "model.layers.0.mlp.experts", Layer(torch.zeros(4, 4)))
    with pytest.raises(ValueError, match="does not know how SGLang lays out"):
        served_pieces(model, 0, 1, hf_config=SimpleNamespace())
