"""The sgl_kernel stand-in on CUDA's import path, and the bundle that takes SGLang to a GPU machine without it
(``benchmarks/gpu_server_check.sh``), checked here without a GPU.

``fake_cuda_imports.py`` imports SGLang's serving modules and ours in a process that believes an sm_90 GPU is
present, with the real sgl_kernel, flashinfer and the other CUDA-only wheels hidden: with the stand-in alone they
must all load (before it named SGLang's CUDA-path ops, 20 of the serving modules failed there), and every package
they import must be on the GPU machine or in the bundle."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sglang_mezo.cpu_stub import stub_path

ROOT = Path(__file__).parents[1]
FROM_ELSEWHERE = {"sglang", "sglang-mezo"}  # the bundle's stripped SGLang; the staged package


def gpu_bundle():
    spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "benchmarks" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normalised(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.fixture(scope="module")
def fake_cuda() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_cuda_imports.py")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_sglangs_serving_modules_load_on_cuda_with_the_stand_in_alone(fake_cuda):
    assert fake_cuda["is_cuda"]
    assert fake_cuda["sgl_kernel"] == str(Path(stub_path()) / "sgl_kernel" / "__init__.py")
    assert fake_cuda["failures"] == {}


@pytest.mark.slow
def test_every_package_they_import_is_on_the_gpu_machine_or_in_the_bundle(fake_cuda):
    bundle = gpu_bundle()
    available = {normalised(n) for n in (*bundle.DEVICE_PACKAGES, *bundle.DEPENDENCIES, *FROM_ELSEWHERE)}
    missing = {top: dists for top, dists in fake_cuda["packages"].items()
               if not any(normalised(d) in available for d in dists)}
    assert not missing, f"imported on CUDA, neither on the GPU machine nor in the bundle: {missing}"
    # and nothing in the bundle that the GPU machine has already (it would shadow the machine's own version)
    assert not {normalised(d) for d in bundle.DEPENDENCIES} & {normalised(d) for d in bundle.DEVICE_PACKAGES}


def test_the_stand_ins_cuda_names_fail_loudly_when_called():
    """A RuntimeError, never NotImplementedError: SGLang's fused-op dispatcher answers that one, under a forced
    backend, by silently taking the CUDA path it was told not to take."""
    folder = Path(stub_path()) / "sgl_kernel"
    spec = importlib.util.spec_from_file_location("sgl_kernel_standin", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    sgl_kernel = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sgl_kernel  # under its own name: the real wheel's may be imported in this process
    try:
        spec.loader.exec_module(sgl_kernel)
        kvcacheio = importlib.import_module("sgl_kernel_standin.kvcacheio")
        quantization = importlib.import_module("sgl_kernel_standin.quantization")
    finally:
        for name in [n for n in sys.modules if n.startswith("sgl_kernel_standin")]:
            del sys.modules[name]
    for fn in (sgl_kernel.rmsnorm, sgl_kernel.silu_and_mul, kvcacheio.transfer_kv_direct,
               quantization.ggml_dequantize):
        with pytest.raises(RuntimeError, match="stand-in") as raised:
            fn()
        assert not isinstance(raised.value, NotImplementedError)
    assert not hasattr(sgl_kernel, "allreduce")  # its absence turns SGLang's custom all-reduce off


@pytest.mark.slow
def test_the_bundle_builds_within_its_limit_stripped_and_patched(tmp_path):
    """Downloads from the package registry (about 31 MiB): SGLang's cp312 wheel less its multimodal, test and Rust
    parts, the dual GEMM's CUTLASS branch patched off, and each dependency as a wheel; unpacked, it holds them."""
    bundle = gpu_bundle()
    manifest = bundle.build(tmp_path / "bundle")
    assert manifest["bytes"] <= bundle.LIMIT_MIB * 2**20
    assert manifest["patched"] == ["sglang/srt/layers/dual_gemm.py"]
    with zipfile.ZipFile(tmp_path / "bundle" / "sglang-0.5.23-stripped.zip") as z:
        names = z.namelist()
        assert "if True:  # sglang-mezo GPU bundle" in z.read("sglang/srt/layers/dual_gemm.py").decode()
    assert not [n for n in names if n.startswith(bundle.CUT) or n.endswith(".so")]
    assert "sglang/srt/managers/scheduler.py" in names
    wheels = {p.name.split("-")[0].lower() for p in (tmp_path / "bundle" / "wheels").glob("*.whl")}
    assert wheels == {normalised(d).replace("-", "_") for d in bundle.DEPENDENCIES}
    bundle.unpack(tmp_path / "bundle", tmp_path / "site")
    for top in ("sglang", "fastapi", "pydantic", "zmq", "msgspec", "uvicorn", "xgrammar", "IPython"):
        assert (tmp_path / "site" / top).is_dir(), top
