#!/usr/bin/env bash
# Architectures across datasets: AlexNet, VGG-19, ResNet-18, ResNet-34 and ResNet-50 trained
# the same way on CIFAR-10, and on CIFAR-100 / Fashion-MNIST when their data dirs are given.
#
#     bash studies/architectures.sh                   # CIFAR-10 -> results/architectures/
#     DATA_CIFAR100=data DATA_FMNIST=data bash studies/architectures.sh   # + the other two
#     DRY_RUN=1 bash studies/architectures.sh         # just print the commands
#
# Published CIFAR-10 top-1 test accuracy (%):
#
#     | AlexNet | VGG-19 | ResNet-18 | ResNet-34 | ResNet-50 |
#     |---------|--------|-----------|-----------|-----------|
#     | 77.6    | 74.7   | 89.3      | 89.6      | 89.2      |
#
# Recipe (the published runs' schedule is not recorded): SGD lr 0.01 (AlexNet and VGG have no
# BatchNorm; VGG-16 does not train at 0.1, see depth_vs_lr.sh), Nesterov momentum 0.9, cosine
# schedule, batch 128, weight decay 5e-4; epochs and augmentation as train.py's per-dataset
# recipe: CIFAR-10 30 and CIFAR-100 60 epochs with --augment standard, Fashion-MNIST 20 epochs
# without augmentation. The table has the last epoch's test accuracy.
#
# Data: CIFAR-10 as JPEG folders, prepared once:
#   mkdir -p /tmp/cifar10-jpeg && tar -xzf cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
# CIFAR-100 and Fashion-MNIST in torchvision's layout under their data dir (downloaded there
# when missing and the machine is online).
#
# Knobs (environment, default): MODELS ("alexnet vgg19 resnet18 resnet34 resnet50"), LR (0.01),
#   DATASET_CIFAR (folder), DATA_CIFAR (/tmp/cifar10-jpeg), DATA_CIFAR100 (unset: skipped),
#   DATASET_CIFAR100 (cifar100), DATA_FMNIST (unset: skipped), DATASET_FMNIST (fashion-mnist),
#   OUT (results/architectures); and those of common.sh: EPOCHS, EPOCHS_SCALE, EXTRA,
#   EVAL_EXTRA, PYTHON, DRY_RUN.
# Runs: $OUT/<cifar10|cifar100|fashion-mnist>-<model>/, then $OUT/comparison.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT=${OUT:-results/architectures}
MODELS=${MODELS:-alexnet vgg19 resnet18 resnet34 resnet50}
LR=${LR:-0.01}
DATASET_CIFAR=${DATASET_CIFAR:-folder}
DATA_CIFAR=${DATA_CIFAR:-/tmp/cifar10-jpeg}
DATASET_CIFAR100=${DATASET_CIFAR100:-cifar100}
DATA_CIFAR100=${DATA_CIFAR100:-}
DATASET_FMNIST=${DATASET_FMNIST:-fashion-mnist}
DATA_FMNIST=${DATA_FMNIST:-}

recipe=(--batch-size 128 --optimizer sgd --lr "$LR" --momentum 0.9 --weight-decay 5e-4 --scheduler cosine)

every_model() {  # every_model NAME DATASET DATA_DIR EPOCHS AUGMENT
    for model in $MODELS; do
        run_train "$1-$model" --model "$model" --dataset "$2" --data-dir "$3" \
            --epochs "$(epochs "$4")" --augment "$5" "${recipe[@]}"
    done
}

every_model cifar10 "$DATASET_CIFAR" "$DATA_CIFAR" 30 standard
if [[ -n $DATA_CIFAR100 ]]; then
    every_model cifar100 "$DATASET_CIFAR100" "$DATA_CIFAR100" 60 standard
fi
if [[ -n $DATA_FMNIST ]]; then
    every_model fashion-mnist "$DATASET_FMNIST" "$DATA_FMNIST" 20 none
fi
compare
