"""``dgate bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from .._device import resolve_device, resolve_dtype
from ..data.datasets import open_dataset
from ..data.loader import iterate, make_loader, spread
from ..evaluation.bench import bench
from ..runtime.loading import load
from . import _options as o
from ._output import out, pct, print_json, progress


def bench_command(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by `dgate export`.", show_default=False)],
    data: o.Data,
    device: o.Device = "auto",
    batch_size: o.BatchSizes = ["1,32"],  # noqa: B006 (typer reads the default, never mutates it)
    images: Annotated[
        int, typer.Option("--images", help="Time on N images, evenly spaced over the data.", min=1)
    ] = 512,
    max_drop: o.MaxDrop = None,
    thresholds: o.Thresholds = None,
    repeats: Annotated[
        int, typer.Option(help="Timed passes over the images per batch size (more: less noise).", min=1)
    ] = 1,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Also time throughput mode (GatedModel.stream): survivors of several batches are pooled so every stage runs full batches.",
        ),
    ] = False,
    no_exits: Annotated[
        bool,
        typer.Option(
            "--no-exits",
            help="Also time the worst case: every open gate computed, no sample let out (what the gates cost when nothing is easy).",
        ),
    ] = False,
    dtype: Annotated[
        str,
        typer.Option(
            help="Run the stages (of both models) in float32, float16 or bfloat16; gates stay float32. Half precision pays on GPUs; check the accuracy column.",
        ),
    ] = "float32",
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (default: torch's choice).", min=1, show_default=False)
    ] = None,
    trust_code: o.TrustCode = False,
    no_verify: o.NoVerify = False,
    json: o.Json = False,
) -> None:
    """Time the gated model against its own backbone (same weights, no gates) on the same real images.

    Interleaved batch by batch after warm-up, synchronised on CUDA. Reports latency p50/p95 per
    batch, images/s, exit fractions, the measured speed-up and the ideal one the FLOPs promise.
    --stream adds a throughput-mode row per batch size (offline scoring: the later stages run
    full batches gathered from several input batches, instead of each batch's dwindling rest).
    --no-exits adds a row per batch size with the open gates computed but nobody leaving: its
    speed-up below 1 is the gates' overhead.

    Example: dgate bench models/r56-gated --data cifar10-jpeg/test --batch-size 1,32 --stream --no-exits
    """
    sizes = o.batch_sizes(batch_size)
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    stage_dtype = resolve_dtype(dtype, "--dtype")
    model = load(model_dir, device=dev, verify=not no_verify, trust_code=trust_code)
    model.stages.to(stage_dtype)  # the gates stay float32
    o.choose_operating_point(model, max_drop, thresholds)
    pre = model.preprocess
    ds = open_dataset(data, pre)
    xs, ys = [], []
    for x, y, _ in iterate(make_loader(ds, 256, indices=spread(len(ds), images))):
        xs.append(x)
        ys.append(y)
    x = pre.normalize(torch.cat(xs).to(dev)).to(stage_dtype)
    y = torch.cat(ys)
    with progress(enabled=not json, unit="batches") as bar:
        result = bench(model, x, y, batch_sizes=sizes, repeats=repeats, progress=bar, stream=stream, no_exits=no_exits)
    if json:
        print_json(result.to_dict())
        return
    table = Table(title=f"dgate bench: {model_dir}, {x.shape[0]} images of {data}", title_justify="left")
    for col in ("batch", "backbone ms", "gated ms", "speed-up", "ideal", "of ideal", "exits", "accuracy"):
        table.add_column(col, justify="right")
    for r in result.rows:
        table.add_row(
            str(r.batch_size) + ("" if r.mode == "batch" else f" {r.mode}"),
            f"{r.backbone_ms:.2f} ({r.backbone_p95_ms:.2f})",
            f"{r.gated_ms:.2f} ({r.gated_p95_ms:.2f})",
            f"[bold]{r.speedup:.2f}x[/]",
            f"{r.ideal_speedup:.2f}x",
            pct(r.efficiency, 0),
            "/".join(f"{100 * f:.0f}" for f in r.exit_fractions) + "%",
            f"{pct(r.accuracy, 1)} ({pct(r.backbone_accuracy, 1)})",
        )
    out.print(table)
    out.print("ms: median (p95) per batch; exits: " + " / ".join(result.exit_names) + "; accuracy: gated (backbone)")
    if any(r.mode == "stream" for r in result.rows):
        out.print("stream rows: whole passes in throughput mode; ms: mean (worst pass) per input batch")
    for r in result.rows:
        if r.mode == "no-exit":
            out.print(
                f"no exits at batch {r.batch_size}: gated {100 * (1 / r.speedup - 1):+.1f}% time against the backbone"
            )
    out.print(f"machine: {result.machine}")
    out.print(
        f"device: {result.device}; stages in {dtype}; thresholds: {', '.join(f'{t:.4g}' for t in result.thresholds)}"
    )
