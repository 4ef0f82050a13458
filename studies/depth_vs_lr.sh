#!/usr/bin/env bash
# Depth vs learning rate: VGG-16 (no BatchNorm) and ResNet-18 trained with SGD at a fixed
# learning rate of 0.1, 0.01 or 0.001, on MNIST (10 epochs) and CIFAR-10 (20 epochs).
#
#     bash studies/depth_vs_lr.sh                     # the whole study -> results/depth_vs_lr/
#     DRY_RUN=1 bash studies/depth_vs_lr.sh           # just print the commands
#     EPOCHS_SCALE=0.2 LRS=0.01 bash studies/depth_vs_lr.sh
#
# Published top-1 test accuracy (%), lr 0.1 / 0.01 / 0.001:
#
#     | model     | MNIST              | CIFAR-10           |
#     |-----------|--------------------|--------------------|
#     | VGG-16    | 9.8 / 99.5 / 99.5  | 10 / 87.1 / 89.2   |
#     | ResNet-18 | 99.2 / 99.4 / 99.3 | 88.7 / 90.0 / 90.1 |
#
# Sixteen layers without shortcuts or BatchNorm make VGG-16 untrainable at lr 0.1 (chance
# accuracy), while ResNet-18 trains at every rate. When the loss goes non-finite, train.py
# stops with "non-finite": the run is listed in $OUT/diverged.txt and the study goes on.
#
# Recipe: SGD, momentum 0.9 (no Nesterov), no schedule (--scheduler none), batch 128,
# weight decay 5e-4; MNIST without augmentation, CIFAR-10 with --augment strong.
#
# Data, prepared once (the defaults read these folders):
#   CIFAR-10: mkdir -p /tmp/cifar10-jpeg && tar -xzf cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
#   MNIST: only the official test set (10,000 images) is at hand; the study trains on 8,000 of
#   them and tests on the other 2,000 (seeded, stratified):
#       python studies/prepare_mnist_8k2k.py DIR_WITH_t10k_FILES /tmp/mnist-8k2k
#
# Knobs (environment, default): DATASETS ("mnist cifar10": which halves run), MODELS
#   ("vgg16 resnet18"), LRS ("0.1 0.01 0.001"),
#   DATASET_MNIST (folder), DATA_MNIST (/tmp/mnist-8k2k), DATASET_CIFAR (folder),
#   DATA_CIFAR (/tmp/cifar10-jpeg), OUT (results/depth_vs_lr); and those of common.sh:
#   SEEDS, EPOCHS, EPOCHS_SCALE, EXTRA, EVAL_EXTRA, PYTHON, DRY_RUN.
# Runs: $OUT/<mnist|cifar10>-<model>-lr<lr>[-seed<S>]/, then $OUT/comparison.md.
#   SEEDS="0 1 2" DATASETS=mnist LRS=0.1 EPOCHS=3 bash studies/depth_vs_lr.sh   # the README's MNIST rows
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT=${OUT:-results/depth_vs_lr}
DATASETS=${DATASETS:-mnist cifar10}
MODELS=${MODELS:-vgg16 resnet18}
LRS=${LRS:-0.1 0.01 0.001}
DATASET_MNIST=${DATASET_MNIST:-folder}
DATA_MNIST=${DATA_MNIST:-/tmp/mnist-8k2k}
DATASET_CIFAR=${DATASET_CIFAR:-folder}
DATA_CIFAR=${DATA_CIFAR:-/tmp/cifar10-jpeg}

sgd=(--optimizer sgd --momentum 0.9 --no-nesterov --scheduler none --batch-size 128 --weight-decay 5e-4)
mnist=(--dataset "$DATASET_MNIST" --data-dir "$DATA_MNIST" --channels 1 --augment none --epochs "$(epochs 10)")
cifar=(--dataset "$DATASET_CIFAR" --data-dir "$DATA_CIFAR" --augment strong --epochs "$(epochs 20)")

for part in $DATASETS; do
    case $part in
        mnist) flags=("${mnist[@]}") ;;
        cifar10) flags=("${cifar[@]}") ;;
        *) echo "error: DATASETS: unknown part '$part' (mnist, cifar10)" >&2; exit 2 ;;
    esac
    for model in $MODELS; do
        for lr in $LRS; do
            run_train "$part-$model-lr$lr" --model "$model" "${flags[@]}" --lr "$lr" "${sgd[@]}"
        done
    done
done
compare
