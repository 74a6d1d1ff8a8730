"""How to start an SGLang server with sglang-mezo: the command line and environment, with CPU defaults.

Used by ``sglang-mezo serve`` and by the tests, so both start servers the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from sglang_mezo.cpu_stub import stub_path

# SGLang on a CPU (see the README): the torch-native attention and sampling backends, fp32 weights (in-place MeZO
# needs them, and --dtype auto picked fp16 on CPU), an explicit KV pool (by default it takes ~70 % of RAM and
# every request slows down) and no busy-spinning scheduler while idle.
CPU_DEFAULTS: dict[str, str | None] = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--dtype": "float32",
    "--max-total-tokens": "16384",
    "--sleep-on-idle": None,
}


def has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: Sequence[str], *flags: str) -> str | None:
    for i, a in enumerate(args):
        for flag in flags:
            if a == flag and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
    return None


def server_command(args: Sequence[str], *, cuda: bool, enable_mezo: bool = True,
                   environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``python -m sglang.launch_server`` command line and environment for ``args``.

    Without CUDA, the CPU defaults above are added unless ``args`` sets them, and the process gets the CPU engine
    switch and the ``sgl_kernel`` stand-in first on its ``PYTHONPATH``. ``--model-path`` must be in ``args``.
    """
    args = list(args)
    if not has_flag(args, "--model-path"):
        raise ValueError("--model-path is required")
    env = dict(os.environ if environ is None else environ)
    if enable_mezo and not has_flag(args, "--enable-mezo"):
        args.append("--enable-mezo")
    if not cuda:
        for flag, value in CPU_DEFAULTS.items():
            if not has_flag(args, flag):
                args += [flag] if value is None else [flag, value]
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (stub_path(), env.get("PYTHONPATH", "")) if p)
        tp = int(_flag_value(args, "--tp", "--tp-size", "--tensor-parallel-size") or 1)
        dp = int(_flag_value(args, "--dp", "--dp-size", "--data-parallel-size") or 1)
        if tp * dp > 1:
            # tensor or data parallel on a CPU: one core set per scheduler process (else SGLang asserts about NUMA
            # nodes), and no NCCL (the CUDA wheels ship one whose communicator fails on a CPU device; all-reduce
            # then uses gloo)
            cores = os.cpu_count() or 1
            env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "|".join(str(rank % cores) for rank in range(tp * dp)))
            env.setdefault("SGLANG_NCCL_SO_PATH", "/nonexistent/libnccl.so")
        env.pop("TRITON_INTERPRET", None)  # a test-only switch; the server's own Triton code must not see it
    return [sys.executable, "-m", "sglang.launch_server", *args], env
