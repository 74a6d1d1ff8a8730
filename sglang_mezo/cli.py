"""``sglang-mezo``: the command line.

    sglang-mezo serve [SGLANG ARGS...]   start SGLang with --enable-mezo; on a machine without CUDA, with the CPU
                                         defaults and, without --model-path, the embedded SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("sglang_mezo")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def serve(sglang_args: list[str]) -> None:
    from sglang_mezo.launch import server_command

    if not any(a == "--model-path" or a.startswith("--model-path=") for a in sglang_args):
        from sglang_mezo.default_model import default_model_path

        sglang_args = ["--model-path", str(default_model_path()), *sglang_args]
    cmd, env = server_command(sglang_args, cuda=_cuda_available())
    logger.info("exec: %s", " ".join(cmd))
    os.execvpe(cmd[0], cmd, env)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="sglang-mezo", description="Fine-tune a served model in place with MeZO.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start an SGLang server with MeZO enabled (other arguments go to SGLang)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        serve(rest)
    else:  # pragma: no cover - argparse rejects unknown commands
        parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    main(sys.argv[1:])
