"""Benchmark of one LoRA contrastive training step: latentembed vs sentence-transformers + PEFT.

The step (the trainer's, :func:`latentembed.training.steps.batch_loss` + ``train_step``): B
queries, their B positives and B hard negatives (one per row), truncated to ``max_length``
tokens; LoRA rank 16 (alpha 32, dropout 0.1) on every linear layer of the backbone; mean
pooling; the InfoNCE loss over in-batch and hard negatives at temperature 0.02; AdamW;
gradients clipped to norm 1. No prompts and no appended EOS on either side, so both embed the
same token ids (checked: the real-token counts must agree).

- ``latentembed``: ``EmbeddingModel.from_pretrained`` + ``add_adapters``; queries and documents
  in one forward through ``model.batch_inputs(batch)`` (the trainer's call, ``packed=None``).
- ``st-peft``: ``SentenceTransformer([Transformer, Pooling("mean")])`` with ``peft.get_peft_model``
  on the backbone and ``MultipleNegativesRankingLoss(scale=50)`` on (anchor, positive, negative)
  columns: three padded forwards, as sentence-transformers trains. Skipped with the reason when
  sentence-transformers or peft is missing.

Every configuration runs in its own subprocess (``python -m latentembed.bench.train_step
--worker SPEC``), so peak memories do not mix: on CPU the peak resident set (``VmHWM``) over
the timed steps, reset after the warm-up (and the whole process's peak too); on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps. Reported: median step time (and
min / max), the peaks, real tokens per second, and latentembed / st-peft ratios, without and
with gradient checkpointing; causal attention on both sides (sentence-transformers runs
Llama causal), plus latentembed bidirectional against the same baseline. ``encode`` embeds
every document text of the workload (fp32, batch 32) on both sides and reports the positions
each computed and its matmul floor: the linear layers' FLOPs over those positions at the fp32
matmul rate measured in the same process (encode is matmul-bound, so the floor says how close
each side is to the machine and which ratio the workload allows at all).

Without ``--model``, a tiny random Llama checkpoint with a tokenizer is written to a temporary
directory (a smoke run: the targets apply to the real model only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .harness import Measurement, environment, write_json
from .train_step_sides import VARIANTS, encode_texts, latentembed_side, st_peft_side, tiny_model_dir

OP = "train_step"
IMPLS = ("latentembed", "st-peft")
#: latentembed / st-peft, on the real model (benchmark targets, never test assertions).
TARGETS = {"step time": 1.0, "peak memory": 1.0, "encode time": 0.75}
IMPORT_OVER_TORCH_S = 0.3


@dataclass
class StepMeasurement(Measurement):
    """A :class:`Measurement` with the training-step figures (``median_ms``: the median step;
    ``peak_extra_mib``: the peak memory of the timed steps, resident set on CPU)."""

    min_ms: float = 0.0
    max_ms: float = 0.0
    real_tokens: int = 0
    positions: int = 0  # positions computed: padded shapes summed (real tokens when packed)
    tokens_per_s: float = 0.0
    peak_process_mib: Optional[float] = None  # whole process (load included), CPU only
    wall_s: float = 0.0  # the worker process, start to end
    over_torch_s: float = 0.0  # "import" rows: the package's import after torch's (median_ms: both)
    floor_s: float = 0.0  # "encode" rows: the linear layers' FLOPs at the measured matmul rate
    matmul_gflops: float = 0.0  # "encode" rows: that rate (fp32, the model's MLP shape)


# -- worker --------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def linear_flops_per_position(cfg: dict, lora_rank: int = 16) -> int:
    """FLOPs per position of the backbone's linear layers (the seven LoRA targets with their
    rank-``lora_rank`` adapters, unmerged as on both sides), from the model directory's
    config.json read as ``cfg`` (Llama / Mistral / Qwen2 keys). Attention scores and elementwise
    work are left out: a lower bound on the forward's work."""
    d, f, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    q, kv = heads * head_dim, cfg.get("num_key_value_heads", heads) * head_dim
    # (in, out) of q, k, v, o, gate, up, down
    shapes = ((d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d))
    per_layer = sum(2 * i * o + 2 * lora_rank * (i + o) for i, o in shapes)
    return cfg["num_hidden_layers"] * per_layer


def matmul_flops_per_s(device: torch.device, k: int, n: int, m: int = 4096, reps: int = 10) -> float:
    """The fp32 matmul rate measured on ``device`` at [m, k] x [k, n] (median of ``reps``
    after 3 warm-ups): the ceiling of a forward made of linear layers of that shape."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    times = []
    for i in range(3 + reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(spec: dict) -> dict:
    """Run one configuration in this process and return its figures (see the module docstring)."""
    start = time.perf_counter()
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    step, encode = (latentembed_side if spec["impl"] == "latentembed" else st_peft_side)(spec)
    out = {}
    if spec["mode"] == "encode":
        texts = encode_texts(spec["encode_texts"])
        encode(texts[:32])  # warm-up
        times = []
        for _ in range(spec["steps"]):
            _sync(device)
            t = time.perf_counter()
            real, positions = encode(texts)
            _sync(device)
            times.append(time.perf_counter() - t)
        cfg = json.loads((Path(spec["model"]) / "config.json").read_text())
        rate = matmul_flops_per_s(device, cfg["hidden_size"], cfg["intermediate_size"])
        out.update(floor_s=positions * linear_flops_per_position(cfg) / rate, matmul_gflops=rate / 1e9)
    else:
        for _ in range(spec["warmup"]):
            step()
        _sync(device)
        _reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(spec["steps"]):
            _sync(device)
            t = time.perf_counter()
            real, positions = step()
            _sync(device)
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        process = None
    else:
        peak = _peak_rss_mib()
        process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(
        times_s=times,
        real_tokens=real,
        positions=positions,
        peak_mib=peak,
        peak_process_mib=process,
        wall_s=time.perf_counter() - start,
    )
    return out


def _missing(impl: str) -> Optional[str]:
    if impl != "st-peft":
        return None
    import importlib.util

    for name in ("sentence_transformers", "peft", "transformers"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    return None


def _run_worker(spec: dict, timeout: float) -> dict:
    main = "import sys; from latentembed.bench.train_step import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", main, "--worker", json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"train_step worker {spec['impl']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the benchmark ---------------------------------------------------------------------------------

#: (name, checkpointing, causal, mode) of every configuration, run for each implementation.
CONFIGS = (
    ("causal", False, True, "step"),
    ("causal+ckpt", True, True, "step"),
    ("bidir", False, False, "step"),
    ("bidir+ckpt", True, False, "step"),
    ("encode", False, True, "encode"),
)


def run(
    device: torch.device,
    copy_gbps: float,
    impls: Optional[Sequence[str]] = None,
    *,
    model: Optional[str] = None,
    steps: int = 5,
    warmup: int = 2,
    configs: Optional[Sequence[str]] = None,
    variants: Sequence[str] = (),
    timeout: float = 1800.0,
):
    """Every configuration of :data:`CONFIGS` for latentembed and st-peft (bidirectional runs
    latentembed only: sentence-transformers runs Llama causal), each in its own subprocess.
    ``variants``: also run these latentembed variants of
    :data:`~latentembed.bench.train_step_sides.VARIANTS` on the step configurations (the
    ablation; their rows' impl is ``latentembed[variant]``)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants must be among {sorted(VARIANTS)}, got {unknown}")
    chosen = [i for i in IMPLS if not impls or i in impls]
    skipped = {}
    for impl in chosen:
        why = _missing(impl)
        if why:
            skipped[impl] = why
    chosen = [i for i in chosen if i not in skipped]
    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="latentembed-train-step-")
        model = str(tiny_model_dir(Path(tmp.name)))
        label = "tiny random Llama"
    else:
        label = Path(model).name
    rows: list[StepMeasurement] = []
    if not configs or "import" in configs:
        rows += [_import_row(impl, label) for impl in chosen]
    try:
        for name, ckpt, causal, mode in CONFIGS:
            if configs and name not in configs:
                continue
            runs = [(impl, "default") for impl in chosen]
            if mode == "step" and "latentembed" in chosen:
                runs += [("latentembed", v) for v in variants if v != "default"]
            for impl, variant in runs:
                if impl == "st-peft" and not causal:
                    skipped.setdefault("st-peft bidir", "sentence-transformers runs Llama with causal attention only")
                    continue
                spec = dict(
                    impl=impl,
                    model=model,
                    device=str(device),
                    checkpointing=ckpt,
                    causal=causal,
                    mode=mode,
                    batch=8,
                    max_length=128,
                    dropout=0.1,
                    steps=steps if mode == "step" else max(1, min(steps, 3)),
                    warmup=warmup,
                    seed=0,
                    encode_texts=284,
                    variant=variant,
                )
                res = _run_worker(spec, timeout)
                times = sorted(res["times_s"])
                med = statistics.median(times)
                rows.append(
                    StepMeasurement(
                        op=OP,
                        case=f"{label} fp32 {name}" if device.type == "cpu" else f"{label} {name}",
                        impl=impl if variant == "default" else f"{impl}[{variant}]",
                        mode=mode,
                        median_ms=med * 1e3,
                        bytes_moved=0,
                        gbps=0.0,
                        pct_copy=0.0,
                        peak_extra_mib=res["peak_mib"],
                        min_ms=times[0] * 1e3,
                        max_ms=times[-1] * 1e3,
                        real_tokens=res["real_tokens"],
                        positions=res["positions"],
                        tokens_per_s=res["real_tokens"] / med,
                        peak_process_mib=res["peak_process_mib"],
                        wall_s=res["wall_s"],
                        floor_s=res.get("floor_s", 0.0),
                        matmul_gflops=res.get("matmul_gflops", 0.0),
                    )
                )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows, skipped


_IMPORTS = {"latentembed": "latentembed", "st-peft": "sentence_transformers, peft"}


def _import_row(impl: str, label: str, reps: int = 3) -> StepMeasurement:
    """Import time in fresh interpreters: torch, then the side's packages (median of ``reps``)."""
    code = (
        "import time; t = time.perf_counter(); import torch; a = time.perf_counter(); "
        f"import {_IMPORTS[impl]}; print(a - t, time.perf_counter() - a)"
    )
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append([float(v) for v in out.stdout.split()[-2:]])
    torch_s, over_s = (statistics.median(v) for v in zip(*runs))
    total_ms = (torch_s + over_s) * 1e3
    return StepMeasurement(OP, f"{label} import", impl, "import", total_ms, 0, 0.0, 0.0, None, over_torch_s=over_s)


def _row(rows, impl: str, config: str) -> Optional[StepMeasurement]:
    return next((r for r in rows if r.impl == impl and r.case.endswith(" " + config)), None)


def summarize(rows: list) -> str:
    """One line per measurement, the ratios latentembed / st-peft and the targets."""
    if not rows:
        return "targets: nothing measured"
    lines = [
        f"{'config':<14} {'impl':<12} {'median s':>9} {'min-max s':>13} {'peak MiB':>9} {'process MiB':>11} "
        f"{'real tok':>8} {'positions':>9} {'tok/s':>7}"
    ]
    for r in rows:
        config = r.case.rsplit(" ", 1)[-1]
        if config == "import":
            lines.append(
                f"{config:<14} {r.impl:<12} {r.median_ms / 1e3:>9.3f}  (torch {r.median_ms / 1e3 - r.over_torch_s:.3f} "
                f"+ {r.over_torch_s:.3f} s)"
            )
            continue
        process = "-" if r.peak_process_mib is None else f"{r.peak_process_mib:.0f}"
        peak = "-" if r.peak_extra_mib is None else f"{r.peak_extra_mib:.0f}"
        lines.append(
            f"{config:<14} {r.impl:<12} {r.median_ms / 1e3:>9.3f} {r.min_ms / 1e3:>6.2f}-{r.max_ms / 1e3:<6.2f} "
            f"{peak:>9} {process:>11} {r.real_tokens:>8} {r.positions:>9} {r.tokens_per_s:>7.0f}"
        )
    real_model = not rows[0].case.startswith("tiny")
    ours = _row(rows, "latentembed", "import")
    if ours is not None:
        verdict = "met" if ours.over_torch_s <= IMPORT_OVER_TORCH_S else "MISSED"
        lines.append(
            f"import latentembed: {ours.over_torch_s:.3f} s over import torch "
            f"(target <= {IMPORT_OVER_TORCH_S} s) -> {verdict}"
        )
    if not real_model:
        lines.append("note: a tiny random model (smoke run); the targets apply to a real model (--model DIR)")
    for config in ("causal", "causal+ckpt", "bidir", "bidir+ckpt", "encode"):
        ours = _row(rows, "latentembed", config)
        base = _row(rows, "st-peft", "encode" if config == "encode" else config.replace("bidir", "causal"))
        if ours is None or base is None:
            continue
        against = "" if "bidir" not in config else " (vs st-peft causal)"
        if config == "encode":
            checks = [("encode time", ours.median_ms / base.median_ms)]
            for r in (ours, base):
                lines.append(
                    f"encode {r.impl}: {r.positions} positions; its linear layers need {r.floor_s:.1f} s at the "
                    f"measured {r.matmul_gflops:.0f} GFLOP/s: {r.floor_s * 1e3 / r.median_ms:.0%} of its median"
                )
            lines.append(
                f"encode: latentembed at its matmul floor would be {ours.floor_s * 1e3 / base.median_ms:.2f}x "
                "st-peft (the best ratio this workload allows in fp32)"
            )
        else:
            checks = [
                ("step time", ours.median_ms / base.median_ms),
                ("peak memory", (ours.peak_extra_mib or 0) / (base.peak_extra_mib or float("inf"))),
            ]
            if ours.real_tokens != base.real_tokens:
                lines.append(f"WARNING {config}: real tokens differ ({ours.real_tokens} vs {base.real_tokens})")
        for what, ratio in checks:
            limit = TARGETS[what]
            verdict = ("met" if ratio <= limit else "MISSED") if real_model and "bidir" not in config else "info"
            lines.append(
                f"{config}{against}: {what} latentembed / st-peft = {ratio:.2f}x (target <= {limit}x) -> {verdict}"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentembed.bench.train_step", description=__doc__)
    parser.add_argument("--worker", help="(internal) run one configuration given as JSON; print its figures")
    parser.add_argument("--model", help="model directory (default: a tiny random model)")
    parser.add_argument(
        "--config", action="append", help=f"only these configurations of {['import'] + [c[0] for c in CONFIGS]}"
    )
    parser.add_argument("--impl", action="append", choices=IMPLS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows (and what was skipped) to this JSON file")
    parser.add_argument(
        "--ablation",
        action="append",
        choices=sorted(VARIANTS),
        help="also run this latentembed variant on the step configurations (repeatable): "
        + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()),
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rows, skipped = run(
        torch.device(args.device),
        0.0,
        args.impl,
        model=args.model,
        steps=args.steps,
        warmup=args.warmup,
        configs=args.config,
        variants=args.ablation or (),
    )
    print(summarize(rows))
    for impl, why in skipped.items():
        print(f"skipped {impl}: {why}")
    if args.json:  # the format of `latentembed bench --json`, with the environment
        write_json(args.json, environment(torch.device(args.device)), 0.0, rows, skipped=skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
