"""Reading and writing pieces of a Hugging Face checkpoint (``sglang_mezo.checkpoint``) without a server: trainable
pieces are read back exactly after they moved, sharded pieces (as tensor-parallel ranks hold them) are pasted into
a complete checkpoint, and what cannot be read is refused before anything is copied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from sglang_mezo.checkpoint import CheckpointError, assemble, load_pieces, plan_reads, tensor_files, write_parts
from sglang_mezo.core.params import TrainablePiece
from sglang_mezo.engines.hf import HFEngine


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_llama(seed=4).save_pretrained(path)
    return path


def test_moved_pieces_are_read_back_exactly(base):
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    expected = {k: v.clone() for k, v in engine.model.state_dict().items()}
    pieces = engine.trainable_pieces()
    for piece in pieces:
        piece.data.add_(0.5)
    plan = plan_reads(base, pieces)
    copied = load_pieces(plan)
    assert copied == sum(p.data.numel() for p in pieces)
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # the tied head is not a tensor of the file: it is read as the embedding
    assert "lm_head.weight" not in tensor_files(base)
    lm_head = TrainablePiece("lm_head.weight", torch.zeros_like(expected["lm_head.weight"]),
                             tuple(expected["lm_head.weight"].shape))
    load_pieces(plan_reads(base, [lm_head]))
    assert torch.equal(lm_head.data, expected["model.embed_tokens.weight"])


def test_a_block_at_an_offset_is_read_from_its_place(base):
    full = load_file(str(base / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    block = TrainablePiece("model.layers.1.mlp.down_proj.weight", torch.zeros(full.shape[0] - 3, 5), tuple(full.shape),
                           row_offset=3, col_offset=7)
    load_pieces(plan_reads(base, [block]))
    assert torch.equal(block.data, full[3:, 7:12])
    bias_like = TrainablePiece("model.norm.weight", torch.zeros(4), (full.shape[0],), col_offset=10)
    load_pieces(plan_reads(base, [bias_like]))
    assert torch.equal(bias_like.data, load_file(str(base / "model.safetensors"))["model.norm.weight"][10:14])


def test_what_cannot_be_read_is_refused_while_planning(base, tmp_path):
    """Planning checks every piece (names, shapes) before a single element is copied."""
    good = TrainablePiece("model.layers.0.self_attn.q_proj.weight", torch.ones(2, 32), (32, 32))
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        plan_reads(base, [good, TrainablePiece("model.nothing.weight", torch.zeros(2), (2,))])
    with pytest.raises(CheckpointError, match="shape"):
        plan_reads(base, [good, TrainablePiece("model.norm.weight", torch.zeros(3), (3,))])
    with pytest.raises(CheckpointError, match="not a local checkpoint folder"):
        tensor_files(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no safetensors"):
        tensor_files(tmp_path)


def test_sharded_parts_assemble_into_a_checkpoint_transformers_loads(base, tmp_path):
    """Two "ranks" each hold half the rows of q_proj and half the columns of o_proj; the assembled folder has the
    moved values there, every other tensor of the base, and the base's other files."""
    q_name, o_name = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    tensors = load_file(str(base / "model.safetensors"))
    moved = {q_name: tensors[q_name] + 1.0, o_name: tensors[o_name] - 2.0}
    half = moved[q_name].shape[0] // 2
    ranks = [
        [TrainablePiece(q_name, moved[q_name][:half], (32, 32)),
         TrainablePiece(o_name, moved[o_name][:, :16], (32, 32))],
        [TrainablePiece(q_name, moved[q_name][half:], (32, 32), row_offset=half),
         TrainablePiece(o_name, moved[o_name][:, 16:], (32, 32), col_offset=16)],
    ]
    parts = [write_parts(tmp_path / "parts" / f"rank{i}.safetensors", pieces) for i, pieces in enumerate(ranks)]
    out = tmp_path / "out"
    assert assemble(base, out, parts) == sorted(moved)
    written = load_file(str(out / "model.safetensors"))
    for name, tensor in tensors.items():
        assert torch.equal(written[name], moved.get(name, tensor)), name
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert torch.equal(loaded[q_name], moved[q_name])


def test_fp32_parts_of_a_bf16_checkpoint_are_rounded_to_it_or_kept_in_fp32_by_choice(tmp_path):
    """A bf16 base, fp32 parts (a half-precision server's masters, with an empty TP shard among them): by default
    the trained tensors are written in bf16, rounded once; with ``dtype=float32`` as the parts hold them, and the
    tensors no part covers stay as they were."""
    base = tmp_path / "base"
    tiny_llama(seed=4).to(torch.bfloat16).save_pretrained(base)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = load_file(str(base / "model.safetensors"))
    master = tensors[name].float() + 1e-4 * torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
    pieces = [TrainablePiece(name, master, tuple(master.shape)),
              TrainablePiece(name, master[:, :0], tuple(master.shape), col_offset=master.shape[1])]
    parts = [write_parts(tmp_path / "parts" / "rank0.safetensors", pieces)]
    assemble(base, tmp_path / "rounded", parts)
    assemble(base, tmp_path / "fp32", parts, dtype=torch.float32)
    rounded = load_file(str(tmp_path / "rounded" / "model.safetensors"))
    exact = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert rounded[name].dtype == torch.bfloat16 and torch.equal(rounded[name], master.to(torch.bfloat16))
    assert exact[name].dtype == torch.float32 and torch.equal(exact[name], master)
    other = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(exact[other], tensors[other]) and torch.equal(rounded[other], tensors[other])


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path):
    a, b = torch.arange(6.0).view(2, 3), torch.arange(4.0)
    save_file({"a.weight": a}, str(tmp_path / "one.safetensors"))
    save_file({"b.bias": b}, str(tmp_path / "two.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "one.safetensors", "b.bias": "two.safetensors"}}))
    assert tensor_files(tmp_path) == {"a.weight": tmp_path / "one.safetensors", "b.bias": tmp_path / "two.safetensors"}
    pieces = [TrainablePiece("a.weight", torch.zeros(1, 3), (2, 3), row_offset=1),
              TrainablePiece("b.bias", torch.zeros(4), (4,))]
    load_pieces(plan_reads(tmp_path, pieces))
    assert torch.equal(pieces[0].data, a[1:]) and torch.equal(pieces[1].data, b)
