#!/usr/bin/env bash
# Residual inception: GoogLeNet on CIFAR-10 with the big branch's kernel 3x3 or 5x5
# (--inception-kernel), without shortcuts or with identity / projection shortcuts around the
# inception modules (--residual), and with the auxiliary heads (--aux-logits, kernel 3, no
# shortcut); next to VGG-19 and ResNet-18 trained the same way (compare their curves.png).
#
#     bash studies/residual_inception.sh              # the whole study -> results/residual_inception/
#     DRY_RUN=1 bash studies/residual_inception.sh    # just print the commands
#     KERNELS=5 RESIDUALS="none identity" AUX=0 BASELINES= bash studies/residual_inception.sh
#
# Published best top-1 test error (%):
#
#     | GoogLeNet        | 3x3   | 5x5   |
#     |------------------|-------|-------|
#     | no shortcut      | 14.56 | 14.33 |
#     | identity         | 13.73 | 13.39 |
#     auxiliary heads (3x3, no shortcut): 14.56 with them, 14.69 without.
#
# Recipe (the published runs' schedule is not recorded; this is train.py's CIFAR-10 recipe at a
# lower lr): 30 epochs, SGD lr 0.01 (VGG without BatchNorm does not train at 0.1, see
# depth_vs_lr.sh), Nesterov momentum 0.9, cosine schedule, batch 128, weight decay 5e-4,
# --augment standard (pad-4 crop + flip). The table has the last epoch's test accuracy (no
# epoch is picked on the test set); metrics.csv has every epoch's.
#
# Data: CIFAR-10 as JPEG folders, prepared once:
#   mkdir -p /tmp/cifar10-jpeg && tar -xzf cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
#
# Knobs (environment, default): KERNELS ("3 5"), RESIDUALS ("none identity projection"),
#   AUX (1: add the aux-heads run), BASELINES ("vgg19 resnet18"; empty: none), LR (0.01),
#   DATASET_CIFAR (folder), DATA_CIFAR (/tmp/cifar10-jpeg), OUT (results/residual_inception);
#   and those of common.sh: EPOCHS, EPOCHS_SCALE, EXTRA, EVAL_EXTRA, PYTHON, DRY_RUN.
# Runs: $OUT/googlenet-k<kernel>[-identity|-projection|-aux]/, $OUT/<baseline>/, then $OUT/comparison.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT=${OUT:-results/residual_inception}
KERNELS=${KERNELS:-3 5}
RESIDUALS=${RESIDUALS:-none identity projection}
AUX=${AUX:-1}
BASELINES=${BASELINES-vgg19 resnet18}
LR=${LR:-0.01}
DATASET_CIFAR=${DATASET_CIFAR:-folder}
DATA_CIFAR=${DATA_CIFAR:-/tmp/cifar10-jpeg}

recipe=(--dataset "$DATASET_CIFAR" --data-dir "$DATA_CIFAR" --epochs "$(epochs 30)" --batch-size 128
        --optimizer sgd --lr "$LR" --momentum 0.9 --weight-decay 5e-4 --scheduler cosine --augment standard)

for k in $KERNELS; do
    for r in $RESIDUALS; do
        if [[ $r == none ]]; then
            run_train "googlenet-k$k" --model googlenet --inception-kernel "$k" "${recipe[@]}"
        else
            run_train "googlenet-k$k-$r" --model googlenet --inception-kernel "$k" --residual "$r" "${recipe[@]}"
        fi
    done
done
if [[ $AUX == 1 ]]; then
    run_train googlenet-k3-aux --model googlenet --inception-kernel 3 --aux-logits "${recipe[@]}"
fi
for model in $BASELINES; do
    run_train "$model" --model "$model" "${recipe[@]}"
done
compare
