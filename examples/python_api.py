"""Use an exported gated model from Python: predictions, exits, and switching operating points.

python examples/python_api.py models/r56-gated ../shared/data/cifar10-jpeg/test
"""

from __future__ import annotations

import sys

import torch

import dgate_cli
from dgate_cli.data.datasets import open_dataset
from dgate_cli.data.loader import iterate, make_loader, spread


def main(model_dir: str, images: str) -> None:
    model = dgate_cli.load(model_dir)  # device="cuda" to run on a GPU
    pre = model.preprocess  # the model's own preprocessing (model.preprocess(pil_images) works too)
    ds = open_dataset(images, pre)
    x, y, _ = next(iterate(make_loader(ds, 512, workers=0, indices=spread(len(ds), 512))))
    x = pre.normalize(x)

    out = model(x)  # samples leave the batch at their own gate
    print(f"gates {model.gate_names}, thresholds {[round(t, 3) for t in model.thresholds]}")
    print(
        f"accuracy {(out.pred == y).float().mean():.4f}, backbone {(model.backbone_forward(x).argmax(1) == y).float().mean():.4f}"
    )
    print("exit fractions", torch.bincount(out.exit, minlength=model.num_gates + 1).div(len(y)).tolist())

    # the stored frontier: trade accuracy for cost at run time, without recalibrating
    for drop in (0.0, 0.005, 0.02):
        point = model.use_operating_point(max_drop=drop)
        out = model(x)
        costs = torch.tensor(model.exit_costs())
        print(
            f"max_drop {drop:.3f}: calibrated accuracy {point.accuracy:.4f}, here {(out.pred == y).float().mean():.4f}; "
            f"mean cost {costs[out.exit].mean() / costs[-1]:.3f} of the backbone"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
