"""Gate your own model: a factory function that returns an ``nn.Module`` is all dgate needs.

The model below is a plain torchvision ResNet-18 for 10 classes, built by a factory with arguments.
Any torch.fx-traceable model works the same way; `dgate stages` shows where gates can go.

    export PYTHONPATH=.   # dgate imports your module like any other: from sys.path (never from the working directory)
    dgate stages examples.own_model:make --model-kwargs '{"num_classes": 10}' --input-size 64
    dgate extract runs/own --model examples.own_model:make --model-kwargs '{"num_classes": 10}' \\
        --weights my_checkpoint.safetensors --train DATA/train --val DATA/val --resize 64 --crop 64 \\
        --gates layer1,layer2.1,layer3
    dgate fit runs/own && dgate calibrate runs/own --max-drop 0.01 && dgate export runs/own --out models/own
    dgate evaluate models/own --data DATA/test --trust-code   # the manifest names your factory: allow it

A spec you type on the command line is yours and runs; one read back from a file (the export's
dgate.json, a run directory's run.json) runs only with --trust-code, or in Python with
``dgate_cli.load(DIR, trust_code=True)`` or ``dgate_cli.load(DIR, factory=make)``.
"""

from __future__ import annotations

import torchvision
from torch import nn


def make(num_classes: int = 10, width_per_group: int = 64) -> nn.Module:
    return torchvision.models.resnet18(num_classes=num_classes, width_per_group=width_per_group)
