"""Import SGLang's serving modules (and ours) in a process that believes an sm_90 GPU is present, with SGLang's CUDA
kernel wheels hidden and the project's ``sgl_kernel`` stand-in first on the path: what a GPU machine that cannot
hold those wheels needs (``benchmarks/gpu_server_check.sh``). Run by ``test_sgl_kernel_standin.py`` in a process of
its own (it patches torch.cuda); prints one JSON object:

``{"failures": {module: error}, "sgl_kernel": the file it came from, "packages": {top-level package: [the
distributions that provide it]}}`` for every package imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import sys

from gpu_server_probe import ENV

from sglang_mezo.cpu_stub import stub_path

HIDDEN_DISTRIBUTIONS = ("sglang-kernel", "flashinfer", "sgl-deep", "sgl-flash", "nvidia-cutlass-dsl",
                        "torch-memory-saver", "flash-attn", "torchcodec", "mistral-common", "pycountry",
                        "pydantic-extra-types", "watchfiles")
"""The distributions of HIDDEN's packages (prefixes of their normalised names): their metadata is hidden too."""
HIDDEN = {
    # the wheels that cannot travel to the GPU machine, or that SGLang can do without when serving a Llama
    "sgl_kernel", "flashinfer", "triton_kernels", "deep_gemm", "deep_ep", "flash_mla", "cutlass", "cutlass_dsl",
    "nvidia_cutlass_dsl", "torch_memory_saver", "flash_attn", "torchcodec", "mistral_common", "pycountry",
    "pydantic_extra_types", "watchfiles",
}
MODULES = [
    "sglang.srt.entrypoints.http_server", "sglang.srt.entrypoints.engine", "sglang.srt.managers.tokenizer_manager",
    "sglang.srt.managers.detokenizer_manager", "sglang.srt.managers.scheduler", "sglang.srt.managers.tp_worker",
    "sglang.srt.model_executor.model_runner", "sglang.srt.model_loader.loader", "sglang.srt.models.llama",
    "sglang.srt.layers.layernorm", "sglang.srt.layers.activation", "sglang.srt.layers.sampler",
    "sglang.srt.layers.logits_processor", "sglang.srt.layers.attention.torch_native_backend",
    "sglang.srt.mem_cache.memory_pool", "sglang.srt.mem_cache.radix_cache",
    "sglang_mezo.plugin", "sglang_mezo.server.app", "sglang_mezo.server.fine_tuning.routes",
    "sglang_mezo.scheduler.handler", "sglang_mezo.jobs.runner",
]


class Hiding(importlib.abc.MetaPathFinder):
    """Python's path finder, blind to the packages in HIDDEN (as if not installed: ``find_spec`` says None, which
    is how SGLang and transformers probe for optional packages), except ``sgl_kernel`` from the stand-in's folder."""

    def __init__(self, finder) -> None:
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top == "sgl_kernel" and "." not in name:
            return self.finder.find_spec(name, [stub_path()], target)
        if top in HIDDEN and top != "sgl_kernel":
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in self.finder.find_distributions(*args, **kwargs):
            if not dist.metadata["Name"].lower().replace("_", "-").startswith(HIDDEN_DISTRIBUTIONS):
                yield dist

    def invalidate_caches(self) -> None:
        self.finder.invalidate_caches()


def fake_cuda() -> None:
    import torch

    class Properties:
        name, major, minor, total_memory, multi_processor_count = "NVIDIA H200", 9, 0, 140 * 2**30, 132
        uuid, L2_cache_size, warp_size, gcnArchName, is_integrated = "GPU-0", 50 * 2**20, 32, "sm_90", False

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_name = lambda device=None: Properties.name
    torch.cuda.get_device_properties = lambda device=None: Properties()
    torch.cuda.mem_get_info = lambda device=None: (130 * 2**30, 140 * 2**30)
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True


def main() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in HIDDEN]:  # a .pth may have imported one
        del sys.modules[name]
    sys.meta_path[:] = [Hiding(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    os.environ.update(ENV)  # what the GPU server check sets
    os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
    fake_cuda()
    failures = {}
    for module in MODULES:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - every failure is the finding
            failures[module] = f"{type(exc).__name__}: {exc}"[:400]
    from sglang.srt.utils import is_cuda

    owners = importlib.metadata.packages_distributions()
    tops = {m.split(".")[0] for m in sys.modules if not m.startswith("_")}
    json.dump({"is_cuda": bool(is_cuda()), "failures": failures,
               "sgl_kernel": getattr(sys.modules.get("sgl_kernel"), "__file__", None),
               "packages": {top: owners[top] for top in sorted(tops) if top in owners}}, sys.stdout)


if __name__ == "__main__":
    main()
