"""The bundle that lets SGLang itself run on a GPU machine that has no SGLang and no network (see docs/gpu.md).

That machine has PyTorch, Triton, transformers and most of SGLang's small dependencies, but not SGLang, its kernel
wheels (sgl-kernel and flashinfer: far too big to travel, 64 MiB at most go with the working tree), nor 32 small
packages SGLang imports. This builds, here, from the package registry:

- SGLang 0.5.23's cp312 wheel (the GPU machine runs Python 3.12), less what a Llama served with torch-native
  attention never imports (``multimodal_gen/``, tests, the Rust extensions: about 23 MiB) and with one patch:
  ``layers/dual_gemm.py`` imports the CUTLASS DSL on CUDA with no fallback, so its mode selection returns "off";
- the 32 dependencies below, at the versions this project's environment resolved for SGLang 0.5.23, as wheels for
  cp312 on manylinux x86_64.

``python benchmarks/gpu_bundle.py build DIR`` writes ``DIR/wheels/*.whl``, ``DIR/sglang-0.5.23-stripped.zip`` and
``DIR/manifest.json`` (what is in it, sizes, what was cut and patched); ``python benchmarks/gpu_bundle.py unpack DIR
SITE`` (on the GPU machine) extracts them all into ``SITE``, a folder to put on ``PYTHONPATH``. The list of
dependencies was found by importing SGLang's serving modules in a process that believes CUDA is present and
reading which distributions the imported modules come from, less those the GPU machine has
(/work/.library/device/KINDS.md, 2026-11-17).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SGLANG = "sglang==0.5.23"
DEPENDENCIES = (
    "annotated-types", "apache-tvm-ffi", "compressed-tensors", "dill", "distro", "fastapi", "gguf", "ipython",
    "jsonschema", "jsonschema-specifications", "loguru", "msgspec", "openai", "opentelemetry-api", "orjson",
    "partial-json-parser", "pybase64", "pydantic", "pydantic_core", "python-multipart", "pyzmq", "referencing",
    "rpds-py", "setproctitle", "sniffio", "soundfile", "starlette", "traitlets", "typing-inspection", "uvicorn",
    "xgrammar", "zstandard",
)
"""What SGLang's serving modules (and ours) import that the GPU machine lacks (tests/test_sgl_kernel_standin.py checks
that every imported package is here or in DEVICE_PACKAGES)."""
DEVICE_PACKAGES = (
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio",
    "attrs", "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle", "cmake",
    "colorama", "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit",
    "cupy-cuda13x", "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils", "execnet", "filelock",
    "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec", "gpytorch", "grpcio", "h11", "h5py",
    "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize", "hypothesis", "idna", "imageio", "iniconfig",
    "interface-meta", "jax", "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib", "jaxtyping", "jinja2", "joblib",
    "kiwisolver", "lazy-loader", "lightning", "lightning-utilities", "linear-operator", "lineax", "llvmlite",
    "lxml", "markdown", "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "meson", "ml-dtypes", "mpi4py",
    "mpmath", "msgpack", "multidict", "multipledispatch", "mypy-extensions", "nanobind", "narwhals", "networkx",
    "ninja", "numba", "numba-cuda", "numpy", "numpyro", "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc",
    "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile", "nvidia-curand",
    "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13", "nvidia-ml-py", "nvidia-nccl-cu13",
    "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx", "onnx-ir", "onnxruntime", "onnxscript",
    "opencv-python-headless", "optax", "opt-einsum", "opt-einsum-fx", "optimistix", "orbax-checkpoint",
    "packaging", "pandas", "pathspec", "patsy", "peft", "pillow", "pip", "pluggy", "portalocker",
    "prometheus-client", "propcache", "protobuf", "psutil", "pyarrow", "pybind11", "py-cpuinfo", "pygments",
    "pyparsing", "pyproject-hooks", "pyre-extensions", "pytest", "pytest-benchmark", "pytest-cov", "pytest-mock",
    "pytest-timeout", "pytest-xdist", "python-dateutil", "pytorch-lightning", "pyyaml", "regex", "requests",
    "rich", "sacrebleu", "safetensors", "scikit-build-core", "scikit-image", "scikit-learn", "scipy", "seaborn",
    "sentencepiece", "sentence-transformers", "setuptools", "shellingham", "simplejson", "six", "sortedcontainers",
    "statsmodels", "sympy", "tabulate", "tensorboard", "tensorboard-data-server", "tensorstore", "threadpoolctl",
    "tifffile", "tiktoken", "timm", "tokenizers", "toolz", "torch", "torchaudio", "torchdiffeq", "torch-geometric",
    "torchmetrics", "torchvision", "tqdm", "transformers", "treescope", "triton", "typer", "typing-extensions",
    "typing-inspect", "urllib3", "uvloop", "wadler-lindig", "werkzeug", "wheel", "wrapt", "xarray", "xxhash",
    "yarl", "zipp",
)
"""The Python packages on the GPU machine (nvidia-h200's image, read on 2026-11-17: /work/.library/device/KINDS.md)."""
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for tag in ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)]
CUT = ("sglang/multimodal_gen/", "sglang/test/", "sglang/srt/rust_extensions/")
"""Parts of the SGLang wheel left out: never imported when serving a Llama (the radix tree's Rust core is replaced
by its Python one with SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python)."""
PATCHES = {
    "sglang/srt/layers/dual_gemm.py": (
        "        if not is_cuda():\n            return None\n",
        "        if True:  # sglang-mezo GPU bundle: no CUTLASS DSL on this machine, no fused dual GEMM\n"
        "            return None\n",
    ),
}
LIMIT_MIB = 60


def pinned() -> list[str]:
    """Each dependency at the version this environment has (the one SGLang 0.5.23's pins resolved to)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in DEPENDENCIES]


def download(requirements: list[str], into: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *PLATFORM, "-d", str(into),
                    *requirements], check=True)


def strip_sglang(wheel: Path, out: Path) -> dict:
    """The wheel's files less :data:`CUT` and every Rust extension, with :data:`PATCHES` applied, as a zip."""
    cut, patched = 0, []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            name = info.filename
            if name.startswith(CUT) or name.endswith(".so"):
                cut += info.file_size
                continue
            data = src.read(info)
            if name in PATCHES:
                old, new = PATCHES[name]
                text = data.decode()
                if old not in text:
                    raise SystemExit(f"the patch for {name} no longer applies: SGLang changed")
                data = text.replace(old, new, 1).encode()
                patched.append(name)
            dst.writestr(info, data)
    if sorted(patched) != sorted(PATCHES):
        raise SystemExit(f"patched {patched}, expected {sorted(PATCHES)}")
    return {"cut_bytes_uncompressed": cut, "cut": list(CUT) + ["*.so"], "patched": patched}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(bundle: Path) -> dict:
    """Download, strip, patch; write the bundle and its manifest; refuse one over :data:`LIMIT_MIB`."""
    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("*.whl"):
        old.unlink()
    download(pinned(), wheels)
    with tempfile.TemporaryDirectory() as tmp:
        download([SGLANG], Path(tmp))
        (sglang_wheel,) = Path(tmp).glob("sglang-*.whl")
        stripped = bundle / "sglang-0.5.23-stripped.zip"
        report = strip_sglang(sglang_wheel, stripped)
    files = [*sorted(wheels.glob("*.whl")), stripped]
    total = sum(f.stat().st_size for f in files)
    manifest = {
        "sglang": SGLANG, "dependencies": pinned(), "python": "cp312", "sglang_wheel": sglang_wheel.name,
        **report, "bytes": total,
        "files": {str(f.relative_to(bundle)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"the bundle is {total / 2**20:.1f} MiB, over its {LIMIT_MIB} MiB")
    return manifest


def unpack(bundle: Path, site: Path) -> None:
    """Every wheel and the stripped SGLang, extracted into ``site`` (what pip would install, scripts aside)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    site.mkdir(parents=True, exist_ok=True)
    for name, entry in manifest["files"].items():
        path = bundle / name
        if _sha256(path) != entry["sha256"]:
            raise SystemExit(f"{name} is not the file the bundle was built with")
        with zipfile.ZipFile(path) as z:
            z.extractall(site)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download, strip and patch into BUNDLE (here)")
    b.add_argument("bundle", type=Path)
    u = sub.add_parser("unpack", help="extract BUNDLE into SITE (on the GPU machine)")
    u.add_argument("bundle", type=Path)
    u.add_argument("site", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        manifest = build(args.bundle)
        print(f"{args.bundle}: {len(manifest['files'])} files, {manifest['bytes'] / 2**20:.1f} MiB")
    else:
        unpack(args.bundle, args.site)


if __name__ == "__main__":
    main()
