"""dgate's fused CPU convolutions (:mod:`dgate_cli.cpu_fusion`) against the ops they replace, and a
lead not taken: the same with the weights reordered once.

On an x86 CPU PyTorch runs a float32 convolution on a batch through oneDNN, which reorders the
weights into its blocked layout on every call (about 20 us for a 64x64x3x3 kernel on a 2-core EPYC,
20% of the convolution itself at batch 4), and runs ReLU and the residual add as passes of their
own. ``dgate.load`` on a CPU now runs conv -> [add ->] relu as one oneDNN call
(``torch.ops.mkldnn._convolution_pointwise``). This script times an export three ways, interleaved
in one process, with ``dgate bench``'s own timing:

    python benchmarks/onednn_fusion.py models/r56-gated --rounds 3

- ``unfused``: dgate before ``cpu_fusion`` (BatchNorm folded, ReLU and add on their own);
- ``fused``: dgate's default now;
- ``packed``: ``fused`` with each convolution's weights reordered once
  (``mkldnn_reorder_conv2d_weight``, for the shape of its first batch of two rows or more). Not in
  dgate: oneDNN picks the weight layout per CPU and shape, and a layout packed for one batch size
  can be many times slower at another (on the EPYC, weights packed for batch 1 ran a batch of 2-32
  9-20x slower), so it would need a pack per layout that Python cannot see.

It also prints each variant's largest difference from the unfused stages on a batch of 32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from _common import CIFAR, emit, require_shared

from dgate_cli import GatedModel, load, tune_malloc
from dgate_cli.data.datasets import open_dataset
from dgate_cli.data.loader import iterate, make_loader, spread
from dgate_cli.data.preprocess import Preprocess
from dgate_cli.evaluation.bench import bench
from dgate_cli.runtime.backends.cpu_fusion import FusedConv2d


class PackedFusedConv2d(FusedConv2d):
    """dgate's fused convolution with its weights reordered once, for the first batch of 2+ rows."""

    packed_weight: torch.Tensor | None = None

    def op_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None:
            w = self.weight.detach().to_mkldnn()
            self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(w, *self.geometry, list(x.shape))
        return self.packed_weight


def _load(model: str, variant: str) -> GatedModel:
    if variant == "unfused":  # dgate before cpu_fusion: BatchNorm folded, pointwise ops on their own
        with mock.patch("dgate_cli.runtime.loading.fuse_pointwise", lambda stage: stage):
            return load(model)
    m = load(model)
    if variant == "packed":
        for mod in m.stages.modules():
            if isinstance(mod, FusedConv2d):
                mod.__class__ = PackedFusedConv2d
    return m


def _passes(variants: dict[str, GatedModel], x: torch.Tensor, sizes: list[int], passes: int) -> list[dict]:
    rows = []
    for b in sizes:
        batches = [c.contiguous() for c in x.split(b) if c.shape[0] == b]
        t: dict[tuple[str, str], list[float]] = {}
        with torch.inference_mode():
            for p in range(passes + 1):  # the first pass warms up every shape
                names = list(variants) if p % 2 else list(reversed(variants))
                for name in names:
                    m = variants[name]
                    for kind, fn in (("backbone", m.backbone_forward), ("gated", m)):
                        start = time.perf_counter()
                        for xb in batches:
                            fn(xb)
                        if p:
                            t.setdefault((name, kind), []).append(1e3 * (time.perf_counter() - start) / len(batches))
        base = {kind: statistics.median(t[("unfused", kind)]) for kind in ("backbone", "gated")}
        for name in variants:
            bb, g = statistics.median(t[(name, "backbone")]), statistics.median(t[(name, "gated")])
            rows.append(
                {
                    "variant": name,
                    "batch": b,
                    "backbone_ms": round(bb, 3),
                    "gated_ms": round(g, 3),
                    "backbone_vs_unfused": round(bb / base["backbone"], 3),
                    "gated_vs_unfused": round(g / base["gated"], 3),
                    "speedup": round(bb / g, 3),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a dgate export directory (CPU, float32)")
    ap.add_argument("--data", default=str(CIFAR / "test"))
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", default="1,32")
    ap.add_argument("--rounds", type=int, default=3, help="rotations over the three variants")
    ap.add_argument("--repeats", type=int, default=3, help="dgate bench repeats per round")
    ap.add_argument(
        "--passes",
        type=int,
        default=0,
        help="instead of dgate bench: this many passes over the images per batch size, each timing every "
        "variant's backbone and gated forward in turn (finer interleaving, for the noisy machines)",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.data == str(CIFAR / "test"):
        require_shared()
    tune_malloc()  # as the dgate command line does
    variants = {name: _load(a.model, name) for name in ("unfused", "fused", "packed")}
    pre = Preprocess.from_dict(variants["unfused"].manifest["preprocess"])
    ds = open_dataset(a.data, pre)
    xs, ys = zip(*[(x, y) for x, y, _ in iterate(make_loader(ds, 256, indices=spread(len(ds), a.images)))], strict=True)
    x, y = pre.normalize(torch.cat(xs)), torch.cat(ys)
    diffs = {}
    with torch.inference_mode():  # each variant's stages against the unfused ones, on a batch of 32
        for name, m in variants.items():
            worst, h = 0.0, x[:32].contiguous(memory_format=torch.channels_last)
            for s, s0 in zip(m.stages, variants["unfused"].stages, strict=True):
                out = s(h)
                worst = max(worst, (out - s0(h)).abs().max().item())
                h = out
            diffs[name] = worst
    sizes = [int(b) for b in a.batch_size.split(",")]
    if a.passes:
        emit(_passes(variants, x, sizes, a.passes), a.json, title=f"{a.model}: medians over {a.passes} passes")
        return
    runs: dict[tuple[str, int, str], list] = {}
    for _ in range(a.rounds):
        for name, m in variants.items():
            r = bench(m, x, y, batch_sizes=sizes, repeats=a.repeats, no_exits=True)
            for row in r.rows:
                runs.setdefault((name, row.batch_size, row.mode), []).append(row)
    rows = []
    for (name, b, mode), rs in runs.items():
        med = {k: statistics.median(getattr(r, k) for r in rs) for k in ("backbone_ms", "gated_ms", "speedup")}
        rows.append(
            {
                "variant": name,
                "batch": b,
                "mode": mode,
                "backbone_ms": round(med["backbone_ms"], 2),
                "gated_ms": round(med["gated_ms"], 2),
                "speedup": round(med["speedup"], 3),
                "of_ideal": round(med["speedup"] / rs[0].ideal_speedup, 3),
                "of_ideal_runs": " ".join(f"{r.speedup / r.ideal_speedup:.3f}" for r in rs),
                "max_abs_diff": diffs[name],
            }
        )
    rows.sort(key=lambda r: (r["batch"], r["mode"], r["variant"]))
    emit(rows, a.json, title=f"{a.model}: medians of {a.rounds} interleaved rounds, dgate bench --repeats {a.repeats}")


if __name__ == "__main__":
    main()
