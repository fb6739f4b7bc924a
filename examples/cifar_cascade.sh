#!/usr/bin/env bash
# The README's cascade example: ResNet-20 answers the easy CIFAR-10 images, ResNet-56 the others.
#   examples/cifar_cascade.sh [DATA_DIR]   (default ../shared/data; run examples/cifar_resnet56.sh first for runs/r56)
# Fit on train, policies and thresholds on val, report on test. About 10 minutes on 2 CPU cores beyond runs/r56.
set -euo pipefail
D=${1:-../shared/data}
DGATE=${DGATE:-dgate}
$DGATE extract runs/r20 --model cifar_resnet20 --weights "$D/checkpoints/cifar-resnet/resnet20-12fca82f.th" \
    --train "$D/cifar10-jpeg/train" --val "$D/cifar10-jpeg/val" --test "$D/cifar10-jpeg/test"
$DGATE fit runs/r20
$DGATE cascade runs/r20-r56 runs/r20 runs/r56 --overwrite
$DGATE fit runs/r20-r56
$DGATE calibrate runs/r20-r56 --max-drop 0
$DGATE export runs/r20-r56 --out models/r20-r56 --overwrite
$DGATE evaluate models/r20-r56 --data "$D/cifar10-jpeg/test"
$DGATE bench models/r20-r56 --data "$D/cifar10-jpeg/test" --batch-size 1,32
