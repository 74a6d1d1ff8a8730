"""Reading pieces of a Hugging Face checkpoint (safetensors) straight into an engine's weights.

Resetting the served weights to the base checkpoint does not need a model reload: only the trainable tensors ever
moved, and each :class:`TrainablePiece` says which block of which checkpoint tensor it holds. This reads exactly
those blocks from disk (one piece-sized temporary at a time) and copies them in place, converting the dtype the
way the engine's loader did (``Tensor.to``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sglang_mezo.core.params import TrainablePiece
from sglang_mezo.core.scales import square_sum

_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint cannot provide the requested tensors."""


def tensor_files(model_dir: str | Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{model_dir!r} is not a local checkpoint folder (hub ids are not read at run time)")
    index = root / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {model_dir}: only safetensors checkpoints can be re-read")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update((name, file) for name in f.keys())
    return out


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, from the safetensors headers alone (no tensor is read)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in tensor_files(model_dir).items():
        by_file.setdefault(file, []).append(name)
    out: dict[str, tuple[int, ...]] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            out.update((name, tuple(f.get_slice(name).get_shape())) for name in names)
    return out


def tensor_square_sums(model_dir: str | Path, names: Iterable[str]) -> dict[str, tuple[float, int]]:
    """(Σ t², elements) of each named checkpoint tensor (:func:`~sglang_mezo.core.scales.square_sum`), read one
    tensor at a time; a tied ``lm_head`` absent from the files is its embedding's, as :func:`plan_reads` reads it."""
    from safetensors import safe_open

    files = tensor_files(model_dir)
    out: dict[str, tuple[float, int]] = {}
    for name in names:
        source = "model.embed_tokens.weight" if name not in files and name == "lm_head.weight" else name
        if source not in files:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {model_dir}")
        with safe_open(files[source], framework="pt") as f:
            out[name] = square_sum(f.get_tensor(source))
    return out


def plan_reads(model_dir: str | Path, pieces: Iterable[TrainablePiece]) -> dict[Path, list[tuple[str, TrainablePiece]]]:
    """Which file and tensor each piece is read from; raises :class:`CheckpointError` before anything is read if
    one is missing. A tied ``lm_head`` absent from the files is read from ``model.embed_tokens.weight``, as
    transformers does."""
    files = tensor_files(model_dir)
    by_file: dict[Path, list[tuple[str, TrainablePiece]]] = {}
    for piece in pieces:
        source = piece.name
        if source not in files and source == "lm_head.weight":
            source = "model.embed_tokens.weight"
        if source not in files:
            raise CheckpointError(f"tensor {piece.name!r} is not in the checkpoint at {model_dir}")
        by_file.setdefault(files[source], []).append((source, piece))
    from safetensors import safe_open

    for file, items in by_file.items():  # shapes too, before a single element is copied
        with safe_open(file, framework="pt") as f:
            for source, piece in items:
                shape = tuple(f.get_slice(source).get_shape())
                if shape != tuple(piece.full_shape):
                    raise CheckpointError(f"{piece.name}: the checkpoint's shape {shape} differs from the served "
                                          f"{tuple(piece.full_shape)}")
                if len(shape) > 2:
                    raise CheckpointError(f"{piece.name}: only 1-D and 2-D tensors can be read back")
    return by_file


def load_pieces(plan: dict[Path, list[tuple[str, TrainablePiece]]],
                write: Callable[[TrainablePiece, torch.Tensor], None] | None = None) -> int:
    """Overwrite each piece's storage with its block of the checkpoint tensor, as :func:`plan_reads` planned (and
    checked); returns the elements copied. ``write`` (piece, block in the checkpoint's dtype) replaces the copy
    (fp32 masters take the block before the served weights are rounded from it)."""
    from safetensors import safe_open

    copied = 0
    for file, items in plan.items():
        with safe_open(file, framework="pt") as f:
            for source, piece in items:
                block = _read_block(f.get_slice(source), piece)
                with torch.no_grad():
                    if write is None:
                        piece.data.copy_(block.to(piece.data.dtype))
                    else:
                        write(piece, block)
                copied += block.numel()
    return copied


def _read_block(source, piece: TrainablePiece) -> torch.Tensor:
    """The piece's block of a checkpoint tensor (shapes were checked by :func:`plan_reads`)."""
    data = piece.data
    if len(piece.full_shape) == 1:
        return source[piece.col_offset : piece.col_offset + data.shape[-1]]
    rows = data.shape[0] if data.dim() == 2 else 1
    return source[piece.row_offset : piece.row_offset + rows, piece.col_offset : piece.col_offset + data.shape[-1]]


# -- saving ---------------------------------------------------------------------------------------------------------
#
# Under tensor parallelism each process holds pieces of a tensor. Saving therefore goes in two phases: every
# process writes its own pieces to a "parts" file (:func:`write_parts`), then one process pastes all parts into the
# base checkpoint's tensors and writes a complete Hugging Face folder (:func:`assemble`). Tensors no piece covers
# are copied from the base unchanged: only the trainable tensors ever move.

_PART_KEY = "{name}|{row}|{col}"


def write_parts(path: str | Path, pieces: Iterable[TrainablePiece],
                read: Callable[[TrainablePiece], torch.Tensor] | None = None) -> Path:
    """Write the pieces' current values (with where they sit in their checkpoint tensors) to one file. ``read``
    gives a piece's values instead of its storage (an fp32 master, for half-precision weights)."""
    from safetensors.torch import save_file

    tensors = {}
    for piece in pieces:
        key = _PART_KEY.format(name=piece.name, row=piece.row_offset, col=piece.col_offset)
        values = piece.data if read is None else read(piece).view(piece.data.shape)
        tensors[key] = values.detach().to("cpu", copy=True).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def assemble(base_dir: str | Path, out_dir: str | Path, part_files: Iterable[str | Path],
             dtype: torch.dtype | None = None) -> list[str]:
    """Write ``out_dir``: the base checkpoint folder with every tensor covered by the parts replaced by the pasted
    parts (in ``dtype``, default the base tensor's), the other files copied. Returns the names of the replaced
    tensors."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, out = Path(base_dir), Path(out_dir)
    files = tensor_files(base)
    parts: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for part_file in part_files:
        for key, value in load_file(str(part_file)).items():
            name, row, col = key.rsplit("|", 2)
            parts.setdefault(name, []).append((int(row), int(col), value))
    if "lm_head.weight" in parts and "lm_head.weight" not in files:
        parts["model.embed_tokens.weight"] = parts.pop("lm_head.weight")  # tied: the file stores the embedding
    unknown = sorted(set(parts) - set(files))
    if unknown:
        raise CheckpointError(f"tensors not in the base checkpoint: {unknown[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():  # config, tokenizer, index, ...: everything but the tensors
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(file))
        for name in tensors.keys() & parts.keys():
            if dtype is not None:
                tensors[name] = tensors[name].to(dtype)
            full = tensors[name]
            view = full.view(-1, full.shape[-1]) if full.dim() > 1 else full.view(1, -1)
            for row, col, value in parts[name]:
                if value.numel() == 0:  # a TP shard made only of padding (e.g. no columns): nothing to paste
                    continue
                block = value.view(-1, value.shape[-1]) if value.dim() > 1 else value.view(1, -1)
                view[row : row + block.shape[0], col : col + block.shape[1]] = block.to(full.dtype)
        save_file(tensors, str(out / file.name), metadata=metadata)
    return sorted(parts)

