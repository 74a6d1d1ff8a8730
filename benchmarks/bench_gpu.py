"""What a pass over the weights and a MeZO step cost on a GPU, against memory speed and the paper's loop, in one run.

For each model shape, built from its config with random weights (no weights travel): TinyLlama-1.1B and
SmolLM2-135M on a GPU, every weight trainable, medians of ``--reps`` timed repetitions after ``--warmup``, each
CUDA-synchronised (events around the call):

* **passes, fp32 in place**: ``copy_`` of the same tensors into a second set (memory speed: one read, one write),
  ``zaxpy_`` with 1 and 2 seeds of each z kind, and the paper's pass (``torch.normal`` or ``randint`` per tensor,
  then ``add_``; ``reference_mezo.perturb``);
* **passes, bf16 + fp32 masters** (``--mezo-master device``, and ``host`` where it applies): a probe pass (served ←
  round(master + εz)), a commit pass (master and served), against ``copy_`` of the fp32 masters;
* **steps**: 16 prompts of 40–80 random tokens, two one-token options, every weight trainable: our step
  (``mezo_step`` on the transformers engine), the paper's Algorithm 1 (``reference_mezo.paper_step``; in bf16 it
  updates the bf16 weights in place), and one forward of the batch as our step scores it; fp32, and bf16 + masters;
* **lr = 0**: ``--lr0-steps`` steps, then how far any weight moved (through masters: none, bit for bit; fp32 in
  place: the ±εz round trips' rounding).

Without CUDA (or with ``--smoke``) the same rows run on a tiny model with a few repetitions: the smoke test CI runs
(``make bench-gpu``). Its figures are a CPU's, never a GPU's.

Writes ``bench_gpu.json`` and ``bench_gpu.md`` to ``--out``; prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from reference_mezo import ChoiceBatch, paper_step, perturb  # noqa: E402

from sglang_mezo.core.master import MasterWeights, Placement  # noqa: E402
from sglang_mezo.core.objectives import ChoiceExample, Objective, batch_loss_fn  # noqa: E402
from sglang_mezo.core.params import TrainableSet  # noqa: E402
from sglang_mezo.core.spsa import mezo_step  # noqa: E402
from sglang_mezo.engines.hf import HFEngine  # noqa: E402
from sglang_mezo.kernels import ZKind  # noqa: E402

SHAPES: dict[str, dict] = {
    # TinyLlama-1.1B's config.json: 1.1 B parameters, 201 tensors, untied head
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    # SmolLM2-135M: 134.5 M parameters, tied embeddings
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # the CPU smoke test's
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
EPS = 1e-3
KINDS = (ZKind.RADEMACHER, ZKind.GAUSSIAN)


class Clock:
    """Milliseconds of a call: CUDA events around it on a GPU (after a synchronize), the host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) * 1e3
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


@dataclass
class Table:
    """Medians (ms) of named rows, measured interleaved rep by rep so that drift hits every row alike."""

    title: str
    rows: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rows[name])

    def measure(self, clock: Clock, calls: dict[str, Callable[[int], object]], reps: int, warmup: int) -> None:
        """Each call gets the repetition's index (so that passes can alternate signs and stay near the weights)."""
        for rep in range(warmup + reps):
            for name, call in calls.items():
                ms = clock(lambda: call(rep))
                if rep >= warmup:
                    self.rows.setdefault(name, []).append(ms)


def build_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    """A Llama of ``shape`` with random weights (std 0.02; norm gains 1), made on ``device`` directly."""
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=256, torch_dtype=dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def choice_batch(vocab: int, n: int = 16, lengths: tuple[int, int] = (40, 80), seed: int = 0):
    """``n`` prompts of random tokens (lengths in ``lengths``), two one-token options, balanced labels: the paper's
    plain batch and our examples of it."""
    gen = torch.Generator().manual_seed(seed)
    prompts = tuple(tuple(torch.randint(3, vocab, (int(torch.randint(lengths[0], lengths[1] + 1, (1,),
                                                                      generator=gen)),), generator=gen).tolist())
                    for _ in range(n))
    options, labels = (5, 7), tuple(i % 2 for i in range(n))
    examples = [ChoiceExample(p, tuple((o,) for o in options), y) for p, y in zip(prompts, labels, strict=True)]
    return ChoiceBatch(prompts, options, labels), examples


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copies_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]  # written once, so the timed copy meets no first touch


def fp32_pass_table(shape: str, device: torch.device, clock: Clock, reps: int, warmup: int) -> Table:
    """One pass over every weight, fp32 in place, against copy_ and the paper's pass."""
    model = build_model(shape, torch.float32, device)
    params = TrainableSet.from_pieces(HFEngine(model).trainable_pieces())
    tensors = [t.theta for t in params.targets]
    copies = copies_of(tensors)
    table = Table(f"{shape}: one pass over all {params.numel / 1e6:.1f} M weights, fp32 in place")
    calls: dict[str, Callable[[int], object]] = {
        "copy_": lambda rep: [c.copy_(t) for c, t in zip(copies, tensors, strict=True)]}
    for kind in KINDS:
        calls[f"zaxpy_, 1 seed, {kind.value}"] = lambda rep, k=kind: params.apply([1], [sign(rep)], kind=k)
        calls[f"zaxpy_, 2 seeds, {kind.value}"] = lambda rep, k=kind: params.apply([1, 2], [sign(rep), -sign(rep)],
                                                                                   kind=k)
        calls[f"paper's pass, {kind.value}"] = lambda rep, k=kind: perturb(tensors, 1, sign(rep), k)
    table.measure(clock, calls, reps, warmup)
    return table


def sign(rep: int) -> float:
    """+ε on even repetitions, -ε on odd ones: passes go out and back, so the weights stay put."""
    return EPS if rep % 2 == 0 else -EPS


def master_pass_table(shape: str, device: torch.device, clock: Clock, reps: int, warmup: int,
                      placement: Placement) -> Table:
    """One pass, bf16 served from fp32 masters: a probe, the probe taken off, a commit; against copy_."""
    model = build_model(shape, torch.bfloat16, device)
    params = TrainableSet.from_pieces(HFEngine(model).trainable_pieces(), masters=MasterWeights(placement))
    masters = [t.master for t in params.targets]
    master_copies = copies_of(masters)
    served = [t.theta for t in params.targets]
    served_copies = copies_of(served)
    table = Table(f"{shape}: one pass, bf16 served from fp32 masters in {placement.value} memory")
    calls: dict[str, Callable[[int], object]] = {
        "copy_ of the fp32 masters": lambda rep: [c.copy_(m) for c, m in zip(master_copies, masters, strict=True)],
        "copy_ of the bf16 weights": lambda rep: [c.copy_(t) for c, t in zip(served_copies, served, strict=True)]}
    for kind in KINDS:
        # a probe on, then off (the second pass serves round(master): a copy, no z)
        calls[f"probe (master -> served), {kind.value}"] = lambda rep, k=kind: params.apply([1], [EPS], kind=k)
        calls[f"probe off (round(master)), {kind.value}"] = lambda rep, k=kind: params.apply([1], [-EPS], kind=k)
        calls[f"commit (master and served), {kind.value}"] = lambda rep, k=kind: params.apply(
            [2], [0.0], [1e-7 if rep % 2 == 0 else -1e-7], kind=k)
    # host masters cross PCIe twice a pass: fewer repetitions (reported, no target)
    table.measure(clock, calls, reps if placement is Placement.DEVICE else max(3, reps // 3), warmup)
    return table


def step_table(shape: str, device: torch.device, clock: Clock, reps: int, warmup: int, dtype: torch.dtype) -> Table:
    """One step on the batch, every weight trainable: ours, the paper's Algorithm 1, one forward; lr = 0 so the
    weights stay where they are. bf16 trains through device masters; the paper's bf16 step updates in place."""
    plain, examples = choice_batch(SHAPES[shape]["vocab_size"])
    model = build_model(shape, dtype, device)
    engine = HFEngine(model)
    masters = MasterWeights() if dtype == torch.bfloat16 else None
    params = TrainableSet.from_pieces(engine.trainable_pieces(), masters=masters)
    tensors = [p.data for p in params.pieces]
    loss = batch_loss_fn(engine, Objective.CLASSIFICATION, examples)
    name = "fp32 in place" if masters is None else "bf16 + fp32 masters (device)"
    table = Table(f"{shape}: one step, 16 prompts of 40-80 tokens, 2 one-token options, {name}")
    fp32 = [t.float() for t in tensors]
    copies = copies_of(fp32)
    calls: dict[str, Callable[[int], object]] = {
        "forward": lambda rep: loss(),
        "copy_ of the fp32 weights": lambda rep: [c.copy_(t) for c, t in zip(copies, fp32, strict=True)]}
    for kind in KINDS:
        calls[f"ours, {kind.value}"] = lambda rep, k=kind: mezo_step(params, loss, [10 + rep], eps=EPS, lr=0.0, kind=k)
        calls[f"paper's Algorithm 1, {kind.value}"] = lambda rep, k=kind: paper_step(
            model, tensors, plain, seed=10 + rep, eps=EPS, lr=0.0, kind=k)
    table.measure(clock, calls, reps, warmup)
    return table


def lr0_drift(shape: str, device: torch.device, steps: int, dtype: torch.dtype, kind: ZKind) -> dict:
    """``steps`` steps of lr = 0 with our step: how far the served weights moved (max |Δ|) and whether they are
    bit-identical to before."""
    _, examples = choice_batch(SHAPES[shape]["vocab_size"])
    model = build_model(shape, dtype, device)
    engine = HFEngine(model)
    params = TrainableSet.from_pieces(engine.trainable_pieces(),
                                      masters=MasterWeights() if dtype == torch.bfloat16 else None)
    before = [p.data.clone() for p in params.pieces]
    loss = batch_loss_fn(engine, Objective.CLASSIFICATION, examples)
    for step in range(steps):
        mezo_step(params, loss, [100 + step], eps=EPS, lr=0.0, kind=kind)
    pairs = list(zip(params.pieces, before, strict=True))
    return {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "masters": dtype == torch.bfloat16,
            "kind": kind.value, "steps": steps,
            "max_abs_drift": max(float((p.data.float() - b.float()).abs().max()) for p, b in pairs),
            "bit_identical": all(torch.equal(p.data, b) for p, b in pairs)}


def measure_shape(shape: str, device: torch.device, clock: Clock, reps: int, warmup: int, lr0_steps: int,
                  host_masters: bool) -> tuple[list[Table], list[dict]]:
    """Every table of one model shape; each built in its own call, so its model is freed before the next."""
    tables, drift = [], []
    print(f"{shape}: passes", flush=True)
    tables.append(fp32_pass_table(shape, device, clock, reps, warmup))
    free_device_memory(device)
    for placement in (Placement.DEVICE, Placement.HOST) if host_masters else (Placement.DEVICE,):
        tables.append(master_pass_table(shape, device, clock, reps, warmup, placement))
        free_device_memory(device)
    print(f"{shape}: steps", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        tables.append(step_table(shape, device, clock, reps, warmup, dtype))
        free_device_memory(device)
    print(f"{shape}: lr = 0 drift", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for kind in KINDS:
            drift.append(lr0_drift(shape, device, lr0_steps, dtype, kind))
            free_device_memory(device)
    return tables, drift


# -- report ------------------------------------------------------------------------------------------------------


def render(tables: list[Table], drift: list[dict], header: str) -> str:
    lines = [header, ""]
    for table in tables:
        reference = next(name for name in table.rows if name.startswith(("copy_", "forward")))
        lines += [f"**{table.title}**", "", f"| row | median ms | × {reference} |", "|---|---|---|"]
        for name in table.rows:
            lines.append(f"| {name} | {table.median(name):.3f} | {table.median(name) / table.median(reference):.2f} |")
        if "forward" in table.rows:
            budget = 2 * table.median("forward") + 3 * table.median("copy_ of the fp32 weights")
            for kind in KINDS:
                ours, paper = table.median(f"ours, {kind.value}"), table.median(f"paper's Algorithm 1, {kind.value}")
                lines.append(f"| ours / paper's Algorithm 1, {kind.value} | | {ours / paper:.2f} |")
                lines.append(f"| ours / (2 × forward + 3 × fp32 copy_), {kind.value} | | {ours / budget:.2f} |")
        lines.append("")
    lines += ["**lr = 0 steps: how far the weights moved**", "",
              "| shape | weights | z | steps | max abs drift | bit-identical |", "|---|---|---|---|---|---|"]
    for d in drift:
        weights = "bf16 + fp32 masters" if d["masters"] else f"{d['dtype']} in place"
        lines.append(f"| {d['shape']} | {weights} | {d['kind']} | {d['steps']} | {d['max_abs_drift']:.3g} | "
                     f"{'yes' if d['bit_identical'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                        help="model shapes (default: TinyLlama-1.1B and SmolLM2-135M on a GPU, tiny on a CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 15 on a GPU, 3 "
                                                               "on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 3; 1 on a CPU)")
    parser.add_argument("--lr0-steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke test's settings even on a GPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "bench-gpu-out")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    shapes = args.shapes or (["TinyLlama-1.1B", "SmolLM2-135M"] if cuda else ["tiny"])
    reps = args.reps or (15 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    clock = Clock(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    header = (f"bench_gpu.py, {time.strftime('%Y-%m-%d')}: {name}, torch {torch.__version__}"
              + (f", CUDA {torch.version.cuda}" if cuda else ", no GPU: a smoke test, not GPU figures")
              + f"; medians of {reps} after {warmup} warm-up")

    tables: list[Table] = []
    drift: list[dict] = []
    for shape in shapes:
        shape_tables, shape_drift = measure_shape(shape, device, clock, reps, warmup, args.lr0_steps,
                                                  host_masters=cuda)
        tables += shape_tables
        drift += shape_drift

    report = render(tables, drift, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.md").write_text(report)
    (args.out / "bench_gpu.json").write_text(json.dumps({
        "header": header, "device": name, "cuda": cuda,
        "tables": [{"title": t.title, "median_ms": {k: t.median(k) for k in t.rows}, "samples_ms": t.rows}
                   for t in tables],
        "lr0": drift}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
