"""The CPU stand-in for sgl_kernel: its one real op matches SGLang's Triton kernel's contract."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sglang_mezo.cpu_stub import stub_path


def load_stub():
    spec = importlib.util.spec_from_file_location("sgl_kernel_stub", f"{stub_path()}/sgl_kernel/__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_assign_req_to_token_pool_cpu():
    stub = load_stub()
    table = torch.full((4, 10), -1, dtype=torch.int32)
    locs = torch.arange(100, 109, dtype=torch.int64)
    stub.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), table, torch.tensor([3, 0]), torch.tensor([7, 5]), locs, 10)
    assert table[2].tolist() == [-1, -1, -1, 100, 101, 102, 103, -1, -1, -1]
    assert table[0].tolist() == [104, 105, 106, 107, 108, -1, -1, -1, -1, -1]
    assert (table[[1, 3]] == -1).all()


def test_unsupported_ops_say_so():
    stub = load_stub()
    with pytest.raises(RuntimeError, match="copy_all_layer_kv_cache_cpu"):
        stub.copy_all_layer_kv_cache_cpu(None, None, None, None)
    assert not hasattr(stub, "convert_weight_packed")
