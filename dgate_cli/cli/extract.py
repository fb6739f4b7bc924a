"""``dgate extract``: cache frozen stage features of every image."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .. import cache
from ..gates.pooling import DEFAULT_BUDGET, Pooling, PoolingPolicy
from ..models.flops import human
from ..pipeline.extract import ExtractResult, extract
from . import _options as o
from ._output import fail, note, out, pct, print_json, progress, warn


def extract_command(
    run_dir: o.RunDir,
    model: o.Model = None,
    weights: o.Weights = None,
    model_kwargs: o.ModelKwargs = None,
    train: Annotated[
        str | None, typer.Option(help="Training images (gates are fitted on them).", show_default=False)
    ] = None,
    val: Annotated[
        str | None, typer.Option(help="Calibration images (thresholds are chosen on them).", show_default=False)
    ] = None,
    test: Annotated[str | None, typer.Option(help="Held-out images for the final report.", show_default=False)] = None,
    gates: o.Gates = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Pooled grid per gate: auto (the finest of 4x4, 2x2, 1x1 within --pool-budget features), or 1, 2, 4, "
            "or several like 1,2. [default: auto]",
            show_default=False,
        ),
    ] = None,
    pool_op: Annotated[
        str | None, typer.Option(help="Pooling operation: avg, max or avg+max. [default: avg]", show_default=False)
    ] = None,
    pool_budget: Annotated[
        int | None,
        typer.Option(help="With --pool auto: most features per gate. [default: 1024]", show_default=False, min=1),
    ] = None,
    resize: Annotated[
        int | None, typer.Option(help="Resize the shorter side to N px (0: no resize).", show_default=False)
    ] = None,
    crop: Annotated[int | None, typer.Option(help="Centre-crop to N x N px (0: no crop).", show_default=False)] = None,
    mean: Annotated[
        str | None, typer.Option(help="Normalisation mean, e.g. 0.485,0.456,0.406.", show_default=False)
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Normalisation std, e.g. 0.229,0.224,0.225.", show_default=False)
    ] = None,
    device: o.Device = "auto",
    batch_size: o.BatchSize = 256,
    workers: o.Workers = None,
    feature_dtype: Annotated[
        str | None,
        typer.Option(
            help="float32 (exact calibration) or float16/bfloat16 (half the disk). [default: float32]",
            show_default=False,
        ),
    ] = None,
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory format (faster convolutions).")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a RUN_DIR that was made for another model or weights.")
    ] = False,
    trust_code: o.TrustCode = False,
    json: o.Json = False,
) -> None:
    """Run the frozen backbone once over each split and cache pooled gate features, logits and labels.

    The cache lives in RUN_DIR/cache as safetensors shards. An interrupted run resumes from its last
    complete shard; a finished cache is reused; a cache made with other settings or files is rebuilt.
    Without --model, the settings of an existing RUN_DIR are reused (e.g. to add --test later).

    Example: dgate extract runs/r56 --model cifar_resnet56 --weights resnet56.th --train cifar/train --val cifar/val --test cifar/test
    """
    splits = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v}
    preprocess = {
        "resize": resize,
        "crop": crop,
        "mean": o.float_tuple(mean, "--mean"),
        "std": o.float_tuple(std, "--std"),
    }
    from_file = model is None
    if model is None:  # reuse the settings of RUN_DIR; options given explicitly change them
        if not cache.run_file(run_dir).is_file():
            fail(f"--model is required: {run_dir} has no earlier extraction to take the settings from")
        old = cache.read_run(run_dir)
        model, model_kwargs = old.model["spec"], model_kwargs or old.model["kwargs"]
        weights = weights or (old.weights or {}).get("source")
        gates = gates or ",".join(old.gates)
        old_pool = PoolingPolicy.from_dict(old.pooling)
        old_sizes = "auto" if old_pool.sizes is None else ",".join(map(str, old_pool.sizes))
        pooling = PoolingPolicy.parse(
            pool or old_sizes, pool_op or "+".join(old_pool.ops), pool_budget or old_pool.budget
        )
        preprocess = {**old.preprocess, **{k: v for k, v in preprocess.items() if v is not None}}
        splits = {**old.splits, **splits}
        feature_dtype = feature_dtype or old.feature_dtype
    else:
        pooling = PoolingPolicy.parse(pool or "auto", pool_op or "avg", pool_budget or DEFAULT_BUDGET)
        if "train" not in splits or "val" not in splits:
            fail("pass --train and --val (the images to fit gates on and to calibrate thresholds on)")
    with progress(enabled=not json) as bar:
        result = extract(
            run_dir,
            model,
            splits,
            weights=weights,
            model_kwargs=model_kwargs,
            gates=o.split_list(gates),
            pooling=pooling,
            device=device,
            batch_size=batch_size,
            workers=workers,
            feature_dtype=feature_dtype or "float32",
            channels_last=channels_last,
            overwrite=overwrite,
            progress=bar,
            preprocess=preprocess,
            trust_code=trust_code or not from_file,  # a spec on the command line is the user's own
        )
    if json:
        print_json(result.to_dict())
        return
    for n in result.notes:
        if n.startswith("warning: "):
            warn(n.removeprefix("warning: "))
        else:
            (warn if "random" in n or "removed" in n else note)(n)
    render(result)


def render(result: ExtractResult) -> None:
    c = result.config
    table = Table(title=f"dgate extract: {c.model['spec']} -> {result.run_dir}", title_justify="left")
    for col in ("split", "images", "backbone acc", "time", "img/s", "cache"):
        table.add_column(col, justify="right" if col not in ("split", "cache") else "left")
    for s in result.splits.values():
        state = "reused" if s.reused else (f"resumed at {s.resumed_from}" if s.resumed_from else "extracted")
        rate = "-" if s.reused else f"{s.images_per_second:,.0f}"
        table.add_row(s.split, f"{s.images:,}", pct(s.backbone_accuracy), f"{s.seconds:.1f} s", rate, state)
    out.print(table)
    gates = ", ".join(
        f"{g} ({Pooling.from_dict(p)}, {d})" for g, p, d in zip(c.gates, c.gate_pooling, c.feature_sizes, strict=True)
    )
    out.print(f"gates (pooling, features): {gates}")
    out.print(f"backbone cost: {human(c.costs['backbone'])}{c.costs['unit']} per image   device: {result.device}")
    out.print(f"next: dgate fit {result.run_dir}")
