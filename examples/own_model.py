"""Gate your own model: a factory function that returns an ``nn.Module`` is all dgate needs.

The model below is a plain torchvision ResNet-18 for 10 classes, built by a factory with arguments.
Any torch.fx-traceable model works the same way; `dgate stages` shows where gates can go.

    dgate stages examples.own_model:make --model-kwargs '{"num_classes": 10}' --input-size 64
    dgate extract runs/own --model examples.own_model:make --model-kwargs '{"num_classes": 10}' \\
        --weights my_checkpoint.safetensors --train DATA/train --val DATA/val --resize 64 --crop 64 \\
        --gates layer1,layer2.1,layer3
(run from the repository root so that `examples` is importable, or put your module on PYTHONPATH)
"""

from __future__ import annotations

import torchvision
from torch import nn


def make(num_classes: int = 10, width_per_group: int = 64) -> nn.Module:
    return torchvision.models.resnet18(num_classes=num_classes, width_per_group=width_per_group)
