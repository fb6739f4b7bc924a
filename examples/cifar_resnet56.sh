#!/usr/bin/env bash
# The README's worked example: gate a pretrained CIFAR-10 ResNet-56 end to end on real data.
#   examples/cifar_resnet56.sh [DATA_DIR]   (default ../shared/data; needs cifar10-jpeg/ and checkpoints/)
# Fit on train, calibrate on val, report on test. About 20 minutes on 2 CPU cores (extract 6, fit 7, calibrate 3).
set -euo pipefail
D=${1:-../shared/data}
DGATE=${DGATE:-dgate}
$DGATE stages cifar_resnet56
$DGATE extract runs/r56 --model cifar_resnet56 --weights "$D/checkpoints/cifar-resnet/resnet56-4bfd9763.th" \
    --train "$D/cifar10-jpeg/train" --val "$D/cifar10-jpeg/val" --test "$D/cifar10-jpeg/test"
$DGATE fit runs/r56
$DGATE calibrate runs/r56 --max-drop 0.01 --plot runs/r56/frontier.png
$DGATE export runs/r56 --out models/r56-gated --overwrite
$DGATE evaluate models/r56-gated --data "$D/cifar10-jpeg/test"
$DGATE bench models/r56-gated --data "$D/cifar10-jpeg/test" --batch-size 1,32
