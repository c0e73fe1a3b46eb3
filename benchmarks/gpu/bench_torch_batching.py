"""Throughput and latency of torch-gpu batching vs the core dynamic batcher, for a real model.

Builds a small ResNet-style conv net at run time (seeded; nothing downloaded), exports it with
``torch.export`` (dynamic batch), loads it through infercore's ``torch`` loader and drives each
batcher directly (no HTTP: this measures the batching backend, not the server) with a closed
loop of concurrent single-image clients for a fixed time per configuration.

Configurations (those needing CUDA are skipped without it, and the JSON says so):

- ``cpu/dynamic``: model on the CPU, core ``dynamic`` batcher.
- ``cpu/torch-gpu``: model on the CPU, ``torch-gpu`` batcher (its CPU fallback).
- ``cuda/dynamic``: model on CUDA, core ``dynamic`` batcher (numpy stack, per-call copies).
- ``cuda/torch-gpu``: model on CUDA, ``torch-gpu`` batcher (pinned buffers, streams).

    python benchmarks/gpu/bench_torch_batching.py --out DIR [--duration 10] [--clients 64]
        [--max-batch 32] [--image-size 32] [--gpu-slots 3] [--skip-cpu]

Writes ``DIR/torch_batching.json`` and ``DIR/torch_batching.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from infercore.builtins.batchers import DynamicBatcher
from infercore.components import Batcher, ComponentContext
from infercore_torch import TorchGpuBatcher, TorchModel

IMAGE = (3, 32, 32)  # --image-size changes the side


class Block(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SmallResNet(torch.nn.Module):
    """Three stages of residual blocks on 32x32 images, 10 classes (about 0.7 M parameters)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, padding=1)
        self.stage1 = Block(width)
        self.down1 = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.stage2 = Block(2 * width)
        self.down2 = torch.nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.stage3 = Block(4 * width)
        self.head = torch.nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(torch.relu(self.stem(x)))
        x = self.stage2(torch.relu(self.down1(x)))
        x = self.stage3(torch.relu(self.down2(x)))
        return self.head(x.mean(dim=(2, 3)))


def export_model(root: Path, image: tuple[int, ...]) -> str:
    torch.manual_seed(0)
    net = SmallResNet().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (torch.randn(4, *image),), dynamic_shapes=({0: batch},))
    torch.export.save(program, root / "resnet.pt2")
    return hashlib.sha256((root / "resnet.pt2").read_bytes()).hexdigest()


async def start_model(root: Path, digest: str, device: str) -> TorchModel:
    config = TorchModel.Config(path="resnet.pt2", trusted=True, sha256=digest, device=device)
    model = TorchModel(config, ComponentContext(path="bench.loader", model_root=root))
    await model.start()
    await model.warmup()
    return model


def make_batcher(
    kind: str, model: TorchModel, root: Path, max_batch: int, gpu_slots: int = 3
) -> Batcher:
    context = ComponentContext(path="bench.batching", model_root=root)
    if kind == "dynamic":
        config = msgspec.convert(
            {"max_batch_size": max_batch, "max_concurrent_batches": 2, "queue_timeout_ms": 30000},
            DynamicBatcher.Config,
        )
        return DynamicBatcher(config, context, model)
    gpu_config = msgspec.convert(
        {
            "max_batch_size": max_batch,
            "max_concurrent_batches": gpu_slots,
            "queue_timeout_ms": 30000,
        },
        TorchGpuBatcher.Config,
    )
    return TorchGpuBatcher(gpu_config, context, model)


async def drive(
    batcher: Batcher, clients: int, duration: float, image: tuple[int, ...]
) -> dict[str, Any]:
    name = batcher.model.inputs[0].name
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(256, 1, *image)).astype(np.float32)
    latencies: list[float] = []
    errors = 0
    first_error: dict[str, str] = {}
    stop_at = loop.time() + duration

    async def client(i: int) -> None:
        nonlocal errors
        k = i
        while loop.time() < stop_at:
            t0 = time.perf_counter()
            try:
                await batcher.submit({name: images[k % 256]}, deadline=loop.time() + 30)
            except Exception as exc:
                errors += 1
                first_error.setdefault("error", f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            k += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(p / 100 * len(ms)))] if ms else float("nan")

    return {
        "requests": len(ms),
        "errors": errors,
        **({"first_error": first_error["error"]} if first_error else {}),
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(ms) / elapsed, 1),
        "latency_ms": {
            "mean": round(statistics.fmean(ms), 3) if ms else None,
            "p50": round(pct(50), 3),
            "p95": round(pct(95), 3),
            "p99": round(pct(99), 3),
        },
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    image = (IMAGE[0], args.image_size, args.image_size)
    results: dict[str, Any] = {
        "model": f"SmallResNet (torch.export, 1x{'x'.join(map(str, image))} per request)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "clients": args.clients,
        "duration_s": args.duration,
        "max_batch_size": args.max_batch,
        "gpu_slots": args.gpu_slots,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        digest = export_model(root, image)
        for device in ("cpu", "cuda"):
            for kind in ("dynamic", "torch-gpu"):
                name = f"{device}/{kind}"
                if device == "cuda" and not cuda:
                    results["runs"][name] = {"skipped": "no CUDA device"}
                    continue
                if device == "cpu" and args.skip_cpu:
                    results["runs"][name] = {"skipped": "--skip-cpu"}
                    continue
                model = await start_model(root, digest, device)
                batcher = make_batcher(kind, model, root, args.max_batch, args.gpu_slots)
                await batcher.start()
                try:
                    await drive(batcher, args.clients, min(1.0, args.duration), image)  # warm
                    results["runs"][name] = await drive(batcher, args.clients, args.duration, image)
                finally:
                    await batcher.stop()
                    await model.stop()
                print(name, json.dumps(results["runs"][name]), file=sys.stderr)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# torch batching: {results['model']}",
        "",
        f"torch {results['torch']}, GPU: {results['gpu'] or 'none'}, "
        f"{results['clients']} closed-loop clients, {results['duration_s']} s per run, "
        f"max_batch_size {results['max_batch_size']}, torch-gpu "
        f"max_concurrent_batches {results.get('gpu_slots', 3)}.",
        "",
        "| run | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in results["runs"].items():
        if "skipped" in run:
            lines.append(f"| {name} | skipped: {run['skipped']} | | | | |")
            continue
        lat = run["latency_ms"]
        lines.append(
            f"| {name} | {run['throughput_rps']} | {lat['p50']} | {lat['p95']} | {lat['p99']} "
            f"| {run['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument(
        "--image-size", type=int, default=32, help="side of each 3-channel request image"
    )
    parser.add_argument(
        "--gpu-slots",
        type=int,
        default=3,
        help="torch-gpu max_concurrent_batches: staging slots, each with its own CUDA stream "
        "(1: copy-in, compute and copy-out of consecutive batches cannot overlap)",
    )
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    (args.out / "torch_batching.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "torch_batching.md").write_text(markdown(results))
    print(markdown(results))
    failed = [n for n, r in results["runs"].items() if r.get("errors")]
    if failed:
        sys.exit(f"requests failed in: {', '.join(failed)}")


if __name__ == "__main__":
    main()
