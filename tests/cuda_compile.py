"""Compile the launches the real launcher makes for CUDA, on a machine with no GPU: the engine of
``test_cuda_compile.py``, run in a process of its own (Triton decides interpreter or compiler for the whole process
when it is imported, and the test session runs the interpreter).

``python tests/cuda_compile.py`` prints one JSON object: ``{"available": false, "reason": ...}`` if this Triton
cannot compile for CUDA without a driver at all (tried on a three-line kernel), else ``{"available": true,
"triton": version, "launches": [...]}``, one entry per distinct specialisation with the figures read off its PTX.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

assert os.environ.get("TRITON_INTERPRET") != "1", "run with TRITON_INTERPRET unset: this compiles for CUDA"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from sglang_mezo.kernels import ZKind, ZSlice, ZTarget, z_triton, zaxpy_  # noqa: E402

BIG_KEY = 0x5DEECE66D1234567  # an int64 key, as tensor_key gives


@dataclass(frozen=True)
class Launch:
    grid: tuple
    args: tuple
    kwargs: dict


class Recorder:
    """Stands in for ``zaxpy_kernel``: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(tuple(grid), args, kwargs))


def record(recorder: Recorder, kind: ZKind, theta: torch.Tensor, where: ZSlice, seeds: list[int], *,
           master: torch.Tensor | None = None, commit: bool = True) -> None:
    """One pass through the real launcher (``ops._zaxpy_triton_``), on CPU tensors, with the recorder as its kernel."""
    real = z_triton.zaxpy_kernel
    z_triton.zaxpy_kernel = recorder
    try:
        n = len(seeds)
        zaxpy_([ZTarget(theta, where, master=master)], seeds, [1e-3] * n, [1e-4] * n, decay=0.99, kind=kind,
               force_triton=True, commit=commit)
    finally:
        z_triton.zaxpy_kernel = real


def record_many(recorder: Recorder, kind: ZKind) -> None:
    real = z_triton.zaxpy_kernel
    z_triton.zaxpy_kernel = recorder
    try:
        shapes = {"embed": (512, 64), "q": (64, 64), "norm": (64,), "up": (176, 64), "bias": (37,)}
        targets = [ZTarget(torch.zeros(shape).view(-1, shape[-1]), ZSlice(BIG_KEY + i, shape[-1]), decay=i % 2 == 0)
                   for i, shape in enumerate(shapes.values())]
        zaxpy_(targets, [3, 4], [1e-3, -1e-3], decay=0.99, kind=kind, force_triton=True)
    finally:
        z_triton.zaxpy_kernel = real


def served_and_master(dtype: torch.dtype, storage: tuple[int, int], cols: slice):
    served = torch.zeros(storage, dtype=dtype)[:, cols]
    return served, torch.zeros(served.shape, dtype=torch.float32)


def cases(recorder: Recorder) -> None:
    """The passes whose launches are compiled (each comment: which integer values it brings)."""
    seeds16 = list(range(1, 17))
    for kind in ZKind:
        # every dtype, in place and behind a master (probe and commit), on a whole tensor: one aligned run of 4096
        # (row_stride, cols, index_row_stride 4096; first_index 0; 4 programs; an int64 key; 1 seed)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            record(recorder, kind, torch.zeros(64, 64, dtype=dtype), ZSlice(BIG_KEY, 64), [7])
        for dtype in (torch.bfloat16, torch.float16):
            for commit in (False, True):
                served, master = served_and_master(dtype, (64, 64), slice(None))
                record(recorder, kind, served, ZSlice(BIG_KEY, 64), [7, 8] if commit else [7], master=master,
                       commit=commit)
        # a row-parallel shard one column wide: row_stride, out_row_stride, cols, first_index, key all 1; 16 seeds
        record(recorder, kind, torch.zeros(48, 1), ZSlice(1, 2, col_offset=1), seeds16)
        served, master = served_and_master(torch.bfloat16, (48, 1), slice(None))
        record(recorder, kind, served, ZSlice(1, 2, col_offset=1), [5], master=master)
        # a one-column tensor stored inside wider rows: index_row_stride 1
        record(recorder, kind, torch.zeros(5, 2)[:, :1], ZSlice(BIG_KEY, 1), [5, 6, 7])
        # unaligned rows of a slice, behind a master: row_stride and out_row_stride 50, cols 37, first_index 321,
        # index_row_stride 100, 3 seeds
        served, master = served_and_master(torch.float16, (7, 50), slice(0, 37))
        record(recorder, kind, served, ZSlice(BIG_KEY, 100, row_offset=3, col_offset=21), [1, 2, 3],
               master=master, commit=True)
        # 16 programs a row, aligned (cols and first_index 16384, index_row_stride 32768); a key below 2^31
        record(recorder, kind, torch.zeros(2, 16384), ZSlice(48, 32768, col_offset=16384), [4])
        # 3 programs a row, unaligned, a far offset (first_index past 2^31: an int64)
        record(recorder, kind, torch.zeros(3, 2500), ZSlice(BIG_KEY, 3000, row_offset=2**31 + 7, col_offset=9),
               [4, 5])
        # adapter probes (scheduler.adapters): a LoRA slot's lora_B view, rank 8 in a pool padded to rank 16
        # (out_row_stride 16, cols 8), and its lora_A view (whole rows), written from a contiguous fp32 master as
        # round(master + c·z), in a bf16 pool and in an fp32 one (an fp32 out behind a master)
        for dtype in (torch.float32, torch.bfloat16):
            served, master = served_and_master(dtype, (96, 16), slice(0, 8))
            record(recorder, kind, served, ZSlice(BIG_KEY, 8), [3], master=master, commit=False)
            served, master = served_and_master(dtype, (8, 64), slice(None))
            record(recorder, kind, served, ZSlice(BIG_KEY, 64), [3], master=master, commit=False)
        # many blocks in one launch: a whole (tiny) model's tensors, 1-D and 2-D, vector path and not
        record_many(recorder, kind)
        # every tile size the launcher chooses: 1, 2, 4, ... groups, up to a full tile
        per_group = 4 if kind is ZKind.GAUSSIAN else 128
        groups = 1
        while groups * per_group <= 1024:
            record(recorder, kind, torch.zeros(groups * per_group), ZSlice(BIG_KEY, groups * per_group), [9])
            groups *= 2


_ACCESS = re.compile(r"@%p\d+ (ld|st)\.global(?:\.\w+)*?(?:\.v(\d))?\.b(\d+)")


def ptx_figures(ptx: str) -> dict:
    """What the tests read off a kernel's PTX: Philox's multiplies, the float64 transform's roots and divisions,
    and the bytes of the masked (predicated) global accesses, which are the weights' (the seeds and coefficients
    are read unmasked)."""
    loaded = stored = 0
    for op, vector, bits in _ACCESS.findall(ptx):
        nbytes = int(vector or 1) * int(bits) // 8
        loaded += nbytes if op == "ld" else 0
        stored += nbytes if op == "st" else 0
    return {"mul_hi": ptx.count("mul.hi.u32"), "sqrt": ptx.count("sqrt.rn.f64"), "div": ptx.count("div.rn.f64"),
            "weight_bytes_loaded": loaded, "weight_bytes_stored": stored,
            "vector_load": "ld.global.v4.b32" in ptx, "vector_store": "st.global.v4.b32" in ptx}


@triton.jit
def _copy_kernel(x_ptr, y_ptr):
    offsets = tl.arange(0, 128)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets))


def compile_all(archs: tuple[int, ...] = (90,), sm80_modes_only: bool = True) -> dict:
    try:
        triton.compile(ASTSource(_copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, {}),
                       target=GPUTarget("cuda", 90, 32))
    except Exception as exc:  # noqa: BLE001 - anything here means "no offline CUDA compile"
        return {"available": False, "triton": triton.__version__, "reason": f"{type(exc).__name__}: {exc}"}
    kernel = z_triton.zaxpy_kernel
    names = [p.name for p in kernel.params]
    recorder = Recorder()
    cases(recorder)
    out, seen, modes_80 = [], set(), set()
    for launch in recorder.launches:
        named = dict(zip(names, launch.args, strict=False))
        mode = (launch.kwargs["KIND"], str(named["theta_base"].dtype), str(named["out_base"].dtype),
                launch.kwargs["WRITE_BACK"])
        for arch in (90, 80):
            if arch == 80 and mode in modes_80:  # Ampere: once per dtype mode and kind (the same front end)
                continue
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*launch.args, **launch.kwargs)
            key = (arch, str(specialization), str(options))
            if key in seen:
                continue
            seen.add(key)
            if arch == 80:
                modes_80.add(mode)
            options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound,
                                                                      specialization, options)
            binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            out.append({
                "arch": arch,
                "grid": list(launch.grid),
                "constexprs": {k: v for k, v in launch.kwargs.items() if k.isupper()},
                "n_seeds": int(named["n_seeds"]),
                "blocks": int(named["table_ptr"].shape[0]),
                "theta_dtype": str(named["theta_base"].dtype),
                "out_dtype": str(named["out_base"].dtype),
                "theta_bytes": named["theta_base"].element_size(),
                "out_bytes": named["out_base"].element_size(),
                "threads": 32 * launch.kwargs["num_warps"],
                "cubin_bytes": len(binary.asm["cubin"]),
                **ptx_figures(binary.asm["ptx"]),
            })
    return {"available": True, "triton": triton.__version__, "launches": out}


if __name__ == "__main__":
    json.dump(compile_all(), sys.stdout)
