"""Extraction throughput vs a bare ``model(x)`` loop over the same DataLoader (issue: within 10%).

Both read the same images through the same DataLoader, preprocessing and memory format; the bare
loop only runs the model, extraction also pools gate features and writes safetensors shards. They
alternate (bare, extract, bare, extract, ...) so machine noise hits both alike; the ratio is
extract images/s over bare images/s, per repeat and in total.

    python benchmarks/extract_throughput.py --model cifar_resnet56 --data ../shared/data/cifar10-jpeg/val
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch
from _common import CHECKPOINTS, emit

from dgate_cli._device import describe, resolve_device
from dgate_cli.data.datasets import open_dataset
from dgate_cli.data.loader import iterate, make_loader
from dgate_cli.models.backbone import build_backbone
from dgate_cli.pipeline.extract import extract


def bare_loop(
    model: str, weights: str | None, data: str, device: torch.device, batch_size: int, workers: int | None
) -> tuple[float, int]:
    bb = build_backbone(model, weights=weights)
    module = bb.module.to(device).to(memory_format=torch.channels_last)
    ds = open_dataset(data, bb.preprocess)
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for images, _labels, _idx in iterate(make_loader(ds, batch_size, workers, pin_memory=device.type == "cuda")):
            x = bb.preprocess.normalize(images.to(device, non_blocking=True)).contiguous(
                memory_format=torch.channels_last
            )
            module(x).float().cpu()
            n += images.shape[0]
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", default=str(CHECKPOINTS / "resnet56-4bfd9763.th"))
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    weights = a.weights if a.weights != "none" else None
    rows = []
    for r in range(a.repeats):
        tb, n = bare_loop(a.model, weights, a.data, dev, a.batch_size, a.workers)
        tmp = tempfile.mkdtemp(prefix="dgate-bench-")
        try:
            t0 = time.perf_counter()
            res = extract(
                tmp,
                a.model,
                {"train": a.data},
                weights=weights,
                device=a.device,
                batch_size=a.batch_size,
                workers=a.workers,
            )
            te = time.perf_counter() - t0
            loop = res.splits["train"].seconds
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(
            {
                "repeat": r,
                "images": n,
                "bare_img_s": n / tb,
                "extract_img_s": n / loop,
                "ratio": (n / loop) / (n / tb),
                "extract_total_s": te,
                "setup_s": te - loop,
            }
        )
    total_bare = sum(x["images"] / x["bare_img_s"] for x in rows)
    total_ext = sum(x["images"] / x["extract_img_s"] for x in rows)
    rows.append(
        {
            "repeat": "all",
            "images": sum(x["images"] for x in rows),
            "bare_img_s": sum(x["images"] for x in rows) / total_bare,
            "extract_img_s": sum(x["images"] for x in rows) / total_ext,
            "ratio": total_bare / total_ext,
            "extract_total_s": None,
            "setup_s": None,
        }
    )
    info = {"model": a.model, "data": a.data, "batch_size": a.batch_size, "device": describe(dev)}
    title = "bare model(x) loop vs dgate extract over the same DataLoader; ratio: extract / bare images/s"
    emit({"throughput": (title, rows)}, a.json, info)


if __name__ == "__main__":
    main()
