"""Measured speed-up of gated models vs their own backbone, through ``dgate bench``; and the gate
kernel against the reference decision path on the same export.

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

``--compare-backends``: each model is timed by ``dgate bench`` processes that alternate between the
default decision backends (the gate kernel, where the install built it) and the reference decision
path (``DGATE_KERNEL=0``), ``--rounds`` of each, which goes first alternating. Per batch size and
mode: each one's median gated ms, their ratio per round (reference / kernel: above 1, the kernel is
faster), and the ratio of the speed-ups each process measured against its own backbone (the less
noisy one: both sides of it share the process and the minutes).

    python benchmarks/runtime.py --r56 models/r56-gated models/r56-gated-ovh --stream --json
    python benchmarks/runtime.py --r56 models/r56-gated --skip-r50 --compare-backends --rounds 3

On a GPU: ``--device cuda --batch-size 1,256`` (``--r50-dir`` keeps the ResNet-50 export for the
next run). ``--malloc-system`` also times ResNet-56 with ``DGATE_MALLOC=system`` (no malloc tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import CIFAR, REPO, emit, require_shared

from dgate_cli.data.datasets import open_dataset
from dgate_cli.data.loader import iterate, make_loader, spread
from dgate_cli.gates.pooling import PoolingPolicy
from dgate_cli.gates.scores import gate_scores
from dgate_cli.models.backbone import build_backbone
from dgate_cli.pipeline.export import manifest_data, write_export
from dgate_cli.pipeline.extract_setup import describe_run
from dgate_cli.runtime import manifest
from dgate_cli.runtime.plan import Gate

# decision backends as a `dgate bench` process gets them: its environment, and the names it reports
BACKENDS = {"kernel": ({}, ["gate kernel"]), "reference": ({"DGATE_KERNEL": "0"}, [])}
SEEN: dict[str, str] = {}  # the device and machine the first dgate bench process reported


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
    weights = [torch.randn(10, d) / d**0.5 for d in info["feature_sizes"]]
    biases = [torch.zeros(10) for _ in weights]
    # thresholds: the score quantile that lets the wanted share of the remaining samples out
    thresholds, alive = [], torch.ones(x.shape[0], dtype=torch.bool)
    with torch.inference_mode():
        h = x.to(device)
        left = 1.0
        for k, stage in enumerate(info["stages"][:-1]):
            h = stage.to(device)(h)
            gate = Gate(weights[k], biases[k], info["poolings"][k], info["layouts"][k]).to(device)
            s = gate_scores(gate(h), "margin")[0].cpu()
            t = float(torch.quantile(s[alive], 1 - fractions[k] / left))
            thresholds.append(t)
            alive &= s < t
            left -= fractions[k]
    for stage in info["stages"]:
        stage.to("cpu")
    names = [c.name for c in info["cuts"]]
    cum = torch.tensor([c["macs"] for c in info["costs"]["stages"]], dtype=torch.float64).cumsum(0).tolist()
    data_ = manifest_data(
        model=bb.spec.to_dict(),
        gates=[
            {"name": n, "layout": lay, "pooling": p.to_dict(), "features": d, "cost": gc}
            for n, lay, p, d, gc in zip(
                names, info["layouts"], info["poolings"], info["feature_sizes"], info["costs"]["gates"], strict=True
            )
        ],
        pooling=policy.to_dict(),
        score="margin",
        classes=ds.classes,
        preprocess=bb.preprocess.to_dict(),
        input_size=int(x.shape[-1]),
        thresholds=thresholds,
        costs={
            "unit": info["costs"]["unit"],
            "reach": [cum[i] for i in range(len(names))] + [cum[-1]],
            "gates": info["costs"]["gates"],
            "stages": info["costs"]["stages"],
        },
    )
    write_export(out, bb.module.state_dict(), weights, biases, data_)
    return out


def dgate_bench(model_dir: Path, a: argparse.Namespace, images: int, extra: list[str], env: dict | None = None) -> dict:
    """One ``dgate bench --json`` process: its result (``BenchResult.to_dict()``)."""
    cmd = [sys.executable, "-m", "dgate_cli", "bench", str(model_dir), "--data", a.data]
    cmd += ["--batch-size", a.batch_size, "--images", str(images), "--repeats", str(a.repeats)]
    cmd += ["--device", a.device, "--json", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.strip()}")
    res = json.loads(p.stdout)
    SEEN.setdefault("device", res["device"])
    SEEN.setdefault("machine", res["machine"])
    return res


def compare_backends(label: str, model_dir: Path, a: argparse.Namespace, images: int, extra: list[str]):
    """Alternating ``dgate bench`` processes per backend: (per-backend median rows, ratio rows)."""
    runs: dict[str, list[dict]] = {name: [] for name in BACKENDS}
    for i in range(a.rounds):
        for name in list(BACKENDS) if i % 2 == 0 else list(BACKENDS)[::-1]:
            env, expected = BACKENDS[name]
            res = dgate_bench(model_dir, a, images, extra, env)
            if res["backends"] != expected:
                sys.exit(
                    f"{name}: dgate bench ran with backends {res['backends']}, expected {expected} (kernel built?)"
                )
            runs[name].append(res)
    rows = [
        _row(f"{label}, {name}", _median_row([res["rows"][k] for res in results]))
        for name, results in runs.items()
        for k in range(len(results[0]["rows"]))
    ]
    ratios = []
    for k, r in enumerate(runs["kernel"][0]["rows"]):
        kern = [res["rows"][k] for res in runs["kernel"]]
        ref = [res["rows"][k] for res in runs["reference"]]
        per_round = [f["gated_ms"] / g["gated_ms"] for f, g in zip(ref, kern, strict=True)]
        ratios.append(
            {
                "model": label,
                "batch": r["batch_size"],
                "mode": r["mode"],
                "ref_gated_ms": round(statistics.median(x["gated_ms"] for x in ref), 3),
                "kernel_gated_ms": round(statistics.median(x["gated_ms"] for x in kern), 3),
                "ref_over_kernel": round(statistics.median(per_round), 3),
                "per_round": [round(v, 3) for v in per_round],
                "ref_speedup": round(statistics.median(x["speedup"] for x in ref), 3),
                "kernel_speedup": round(statistics.median(x["speedup"] for x in kern), 3),
                "speedup_ratio": round(
                    statistics.median(g["speedup"] / f["speedup"] for f, g in zip(ref, kern, strict=True)), 3
                ),
            }
        )
    return rows, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--r56", type=Path, nargs="+", default=[], help="calibrated CIFAR ResNet-56 exports (skipped if not given)"
    )
    ap.add_argument("--stream", action="store_true", help="also time throughput mode (dgate bench --stream)")
    ap.add_argument("--data", default=str(CIFAR / "test"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (dgate bench --device)")
    ap.add_argument("--batch-size", default="1,32")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--r50-images", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the images (noise)")
    ap.add_argument("--skip-r50", action="store_true")
    ap.add_argument("--r50-dir", type=Path, help="keep the ResNet-50 export here (made if missing, else reused)")
    ap.add_argument(
        "--malloc-system", action="store_true", help="also time ResNet-56 with DGATE_MALLOC=system (no malloc tuning)"
    )
    ap.add_argument(
        "--compare-backends",
        action="store_true",
        help="time the gate kernel against the reference decisions (DGATE_KERNEL=0), alternating processes",
    )
    ap.add_argument("--rounds", type=int, default=2, help="with --compare-backends: processes per backend")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    if a.data == str(CIFAR / "test"):
        require_shared()
    flags = ["--no-exits", *(["--stream"] if a.stream else [])]
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [(f"{manifest.read(p)['model']['spec']} {p.name}", p.resolve(), a.images) for p in a.r56]
        if not a.skip_r50:
            d = a.r50_dir.resolve() if a.r50_dir else Path(tmp) / "r50"
            if not (d / manifest.MANIFEST).is_file():
                make_resnet50_export(d, a.data, a.r50_images, device=a.device)
            models.append(("resnet50 30/20/20% exits", d, a.r50_images))
        for label, d, n in models:
            if a.compare_backends:
                r, q = compare_backends(label, d, a, n, flags)
                rows += r
                ratios += q
            else:
                rows += [_row(label, r) for r in dgate_bench(d, a, n, flags)["rows"]]
            if a.malloc_system and not label.startswith("resnet50"):
                res = dgate_bench(d, a, n, [], {"DGATE_MALLOC": "system"})
                rows += [_row(f"{label}, malloc system", r) for r in res["rows"]]
    tables = {"bench": (f"dgate bench ({a.device}); exits: % per gate, then the backbone", rows)}
    if a.compare_backends:
        title = f"gate kernel vs reference decisions, {a.rounds} alternating dgate bench processes each"
        tables["backends"] = (title, ratios)
    emit(tables, a.json, dict(SEEN))


def _median_row(rs: list[dict]) -> dict:
    """One dgate bench row from several runs of it: the median of each timing, the first run's exits."""
    keys = ("backbone_ms", "gated_ms", "speedup", "backbone_images_per_s", "gated_images_per_s")
    med = {k: statistics.median(r[k] for r in rs) for k in keys}
    return {**rs[0], **med, "efficiency": med["speedup"] / rs[0]["ideal_speedup"]}


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
    }


if __name__ == "__main__":
    main()
