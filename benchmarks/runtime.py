"""Measured speed-up of gated models vs their own backbone, through ``dgate bench``.

Two models:
  * calibrated CIFAR ResNet-56 exports from the README pipeline (``--r56 DIR [DIR ...]``, e.g.
    calibrated with and without ``--gate-overhead``), on CIFAR test;
  * a torchvision ResNet-50 at 224 px with random weights and random gates after layer1..3, with
    thresholds set on the images so that about 30% / 20% / 20% of them leave at the three gates
    (a realistic share; random weights are fine for timing), on CIFAR test images resized to 224.

For each: batch sizes (default 1 and 32), speed-up vs the ideal one the MACs promise, and the
overhead of gates that run but let nobody out (``dgate bench --no-exits``: thresholds above every
score; gates the calibration closed stay closed). ``--stream`` adds throughput-mode rows (batch
sizes above 1).

    python benchmarks/runtime.py --r56 models/r56-gated models/r56-gated-ovh --stream --json

On a GPU: ``--device cuda --batch-size 1,256 --cuda-graphs`` (graphed rows beside the eager ones;
``--r50-dir`` keeps the ResNet-50 export for the next run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import CIFAR, REPO, emit, require_shared

from dgate_cli import __version__
from dgate_cli.data.datasets import open_dataset
from dgate_cli.data.loader import iterate, make_loader, spread
from dgate_cli.gates.pooling import PoolingPolicy, pool
from dgate_cli.models.backbone import build_backbone
from dgate_cli.pipeline.export import write_export
from dgate_cli.pipeline.extract import describe_run


def make_resnet50_export(
    out: Path, data: str, images: int, fractions=(0.3, 0.2, 0.2), seed: int = 0, device: str = "cpu"
) -> Path:
    """A gated ResNet-50 export with random weights, exit thresholds set by score quantiles
    (the scores computed on ``device``)."""
    torch.manual_seed(seed)
    bb = build_backbone("resnet50", model_kwargs={"num_classes": 10})
    policy = PoolingPolicy()
    ds = open_dataset(data, bb.preprocess)
    x = torch.cat([b for b, _, _ in iterate(make_loader(ds, 64, indices=spread(len(ds), images)))])
    x = bb.preprocess.normalize(x)
    info = describe_run(bb, None, policy, x[:1])
    weights = [torch.randn(10, d) / math.sqrt(d) for d in info["feature_sizes"]]
    biases = [torch.zeros(10) for _ in weights]
    # thresholds: the score quantile that lets the wanted share of the remaining samples out
    thresholds, alive = [], torch.ones(x.shape[0], dtype=torch.bool)
    with torch.inference_mode():
        h = x.to(device)
        left = 1.0
        for k, stage in enumerate(info["stages"][:-1]):
            h = stage.to(device)(h)
            z = (
                pool(h, info["poolings"][k], info["layouts"][k]) @ weights[k].t().to(device) + biases[k].to(device)
            ).cpu()
            s = z.topk(2, 1).values
            s = s[:, 0] - s[:, 1]  # margin
            share = fractions[k] / left
            t = float(torch.quantile(s[alive], 1 - share))
            thresholds.append(t)
            alive &= s < t
            left -= fractions[k]
    for stage in info["stages"]:
        stage.to("cpu")
    cum = torch.tensor([c["macs"] for c in info["costs"]["stages"]], dtype=torch.float64).cumsum(0).tolist()
    data_ = {
        "schema_version": 1,
        "dgate_version": __version__,
        "model": bb.spec.to_dict(),
        "gates": [
            {"name": c.name, "layout": lay, "pooling": p.to_dict(), "features": d, "cost": gc}
            for c, lay, p, d, gc in zip(
                info["cuts"],
                info["layouts"],
                info["poolings"],
                info["feature_sizes"],
                info["costs"]["gates"],
                strict=True,
            )
        ],
        "pooling": policy.to_dict(),
        "score": "margin",
        "classes": ds.classes,
        "preprocess": bb.preprocess.to_dict(),
        "input_size": int(x.shape[-1]),
        "thresholds": thresholds,
        "costs": {
            "unit": "MACs",
            "reach": [cum[i] for i in range(len(info["cuts"]))] + [cum[-1]],
            "gates": info["costs"]["gates"],
        },
    }
    write_export(out, bb.module.state_dict(), weights, biases, data_)
    return out


def dgate_bench(
    model_dir: Path,
    data: str,
    batch_sizes: str,
    images: int,
    repeats: int,
    extra: list[str],
    env: dict | None = None,
    device: str = "cpu",
) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "dgate_cli",
        "bench",
        str(model_dir),
        "--data",
        data,
        "--batch-size",
        batch_sizes,
        "--images",
        str(images),
        "--repeats",
        str(repeats),
        "--device",
        device,
        "--json",
        *extra,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--r56", type=Path, nargs="+", default=[], help="calibrated CIFAR ResNet-56 exports (skipped if not given)"
    )
    ap.add_argument("--stream", action="store_true", help="also time throughput mode (dgate bench --stream)")
    ap.add_argument(
        "--cuda-graphs", action="store_true", help="also time with dgate bench --cuda-graphs (with --device cuda)"
    )
    ap.add_argument("--data", default=str(CIFAR / "test"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (dgate bench --device)")
    ap.add_argument("--batch-size", default="1,32")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--r50-images", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the images (noise)")
    ap.add_argument("--only-cuda-graphs", action="store_true", help="time with dgate bench --cuda-graphs only")
    ap.add_argument("--skip-r50", action="store_true")
    ap.add_argument("--r50-dir", type=Path, help="keep the ResNet-50 export here (made if missing, else reused)")
    ap.add_argument(
        "--malloc-system", action="store_true", help="also time ResNet-56 with DGATE_MALLOC=system (no malloc tuning)"
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    require_shared()
    rows = []
    variants = []  # (label suffix, dgate bench flags)
    if not a.only_cuda_graphs:
        variants.append(("", ["--no-exits", *(["--stream"] if a.stream else [])]))
    if a.cuda_graphs or a.only_cuda_graphs:  # (--stream runs eagerly: not with graphs)
        variants.append((", CUDA graphs", ["--no-exits", "--cuda-graphs"]))
    for r56 in a.r56:
        r56 = r56.resolve()
        for suffix, extra in variants:
            for r in dgate_bench(r56, a.data, a.batch_size, a.images, a.repeats, extra, None, a.device):
                rows.append(_row(f"resnet56 {r56.name}{suffix}", r))
        if a.malloc_system:
            for r in dgate_bench(r56, a.data, a.batch_size, a.images, a.repeats, [], {"DGATE_MALLOC": "system"}):
                rows.append(_row(f"resnet56 {r56.name}, malloc system", r))
    if not a.skip_r50:
        with tempfile.TemporaryDirectory() as tmp:
            d = a.r50_dir.resolve() if a.r50_dir else Path(tmp) / "r50"
            if not (d / "dgate.json").is_file():
                make_resnet50_export(d, a.data, a.r50_images, device=a.device)
            for suffix, extra in variants:
                for r in dgate_bench(d, a.data, a.batch_size, a.r50_images, a.repeats, extra, device=a.device):
                    rows.append(_row(f"resnet50 30/20/20% exits{suffix}", r))
    emit(rows, a.json, title=f"dgate bench ({a.device}): {rows[0]['device'] if rows else ''}")


def _row(label: str, r: dict) -> dict:
    return {
        "model": label,
        "batch": r["batch_size"],
        "mode": r["mode"],
        "backbone_ms": round(r["backbone_ms"], 2),
        "gated_ms": round(r["gated_ms"], 2),
        "speedup": round(r["speedup"], 3),
        "ideal": round(r["ideal_speedup"], 3),
        "of_ideal": round(r["efficiency"], 3),
        "flops_ratio": round(r["flops_ratio"], 3),
        "exits": "/".join(f"{100 * f:.0f}" for f in r["exit_fractions"]),
        "backbone_img_s": round(r["backbone_images_per_s"], 1),
        "gated_img_s": round(r["gated_images_per_s"], 1),
        "device": r["device"],
    }


if __name__ == "__main__":
    main()
