"""``sglang-mezo``: the command line.

    sglang-mezo serve [SGLANG ARGS...]   start SGLang with --enable-mezo; on a machine without CUDA, with the CPU
                                         defaults and, without --model-path, the embedded SmolLM2-135M-Instruct
    sglang-mezo train JOB.json [...]     submit a job (the body of POST /mezo/step) to a running server, follow it
                                         with a progress bar, print the result table; optionally go back to the
                                         best evaluated step, save the weights and the trajectory
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("sglang_mezo")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


SERVE_FOLDERS = {"--mezo-data-dir": "mezo-data", "--mezo-output-dir": "mezo-checkpoints"}
"""``sglang-mezo serve``'s folders, in the working directory, unless the command line names its own."""


def serve(sglang_args: list[str]) -> None:
    from sglang_mezo.launch import has_flag, server_command

    if not has_flag(sglang_args, "--model-path"):
        from sglang_mezo.default_model import default_model_path

        sglang_args = ["--model-path", str(default_model_path()), *sglang_args]
    for flag, folder in SERVE_FOLDERS.items():
        if not has_flag(sglang_args, flag):
            path = Path.cwd() / folder
            path.mkdir(exist_ok=True)
            sglang_args = [*sglang_args, flag, str(path)]
            logger.info("%s %s (data files are read from, and checkpoints written to, only the folders given)",
                        flag, path)
    cmd, env = server_command(sglang_args, cuda=_cuda_available())
    logger.info("exec: %s", " ".join(cmd))
    os.execvpe(cmd[0], cmd, env)


def train(args: argparse.Namespace) -> int:
    from sglang_mezo.client import MezoClient, MezoError, format_job

    try:
        job = json.loads(Path(args.job).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"sglang-mezo train: cannot read the job file {args.job}: {exc}") from exc
    for key in ("steps", "lr", "eps", "seed"):
        if getattr(args, key) is not None:
            job[key] = getattr(args, key)
    client = MezoClient(args.url, api_key=args.api_key, admin_api_key=args.admin_api_key)
    try:
        status = client.train(job, progress=not args.quiet)
        print(format_job(status))
        if args.reset_to_best and status.get("best_eval"):
            best = status["best_eval"]["step"]
            client.reset(status["job_id"], best)
            print(f"serving the best evaluated weights: step {best} of job {status['job_id']}")
        if args.trajectory and status["step"]:
            Path(args.trajectory).write_text(json.dumps(client.trajectory(status["job_id"])))
            print(f"trajectory: {args.trajectory}")
        if args.save:
            saved = client.save(args.save, overwrite=args.overwrite)
            print(f"saved {saved['weight_version']} to {saved['path']} ({saved['message']})")
    except MezoError as exc:
        raise SystemExit(f"sglang-mezo train: the server refused: {exc}") from exc
    except OSError as exc:
        raise SystemExit(f"sglang-mezo train: cannot reach {args.url}: {exc}") from exc
    except KeyboardInterrupt:
        raise SystemExit("sglang-mezo train: interrupted; the job was cancelled on the server") from None
    return 0 if status["status"] == "succeeded" else 1


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="sglang-mezo", description="Fine-tune a served model in place with MeZO.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start an SGLang server with MeZO enabled (other arguments go to SGLang)",
                   add_help=False)
    tr = sub.add_parser("train", help="run a MeZO job on a running server and report it")
    tr.add_argument("job", help="a JSON file: the body of POST /mezo/step (examples or a dataset, steps, lr, ...)")
    tr.add_argument("--url", default="http://127.0.0.1:30000", help="the server (default: %(default)s)")
    tr.add_argument("--api-key", default=None,
                    help="the server's --api-key (default: the SGLANG_API_KEY environment variable)")
    tr.add_argument("--admin-api-key", default=None,
                    help="the server's --admin-api-key, for training, resets and saves (default: the "
                         "SGLANG_ADMIN_API_KEY environment variable; without one, the API key)")
    tr.add_argument("--steps", type=int, help="override the job's steps")
    tr.add_argument("--lr", type=float, help="override the job's learning rate")
    tr.add_argument("--eps", type=float, help="override the job's perturbation scale")
    tr.add_argument("--seed", type=int, help="override the job's seed")
    tr.add_argument("--reset-to-best", action="store_true",
                    help="afterwards, serve the weights of the best evaluated step (exact replay)")
    tr.add_argument("--trajectory", metavar="FILE", help="write the job's trajectory (seeds and gradients) here")
    tr.add_argument("--save", metavar="NAME",
                    help="save the served weights as an HF checkpoint: a folder name inside the server's "
                         "--mezo-output-dir")
    tr.add_argument("--overwrite", action="store_true", help="with --save: replace a checkpoint saved before")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        serve(rest)
    elif args.command == "train":
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        sys.exit(train(args))
    else:  # pragma: no cover - argparse rejects unknown commands
        parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    main(sys.argv[1:])
