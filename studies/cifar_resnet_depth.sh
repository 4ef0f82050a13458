#!/usr/bin/env bash
# CIFAR ResNet depth: ResNet-20/32/44/56/110 on CIFAR-10 with the ResNet paper's recipe, and
# their plain twins without shortcuts (--plain: 20/32/44/56), showing the degradation problem:
# plain-56 ends with a higher *training* error than plain-20, while ResNet-56 ends below
# ResNet-20 (He et al. 2015, fig. 6). $OUT/errors.md lists each run's final training and test
# error next to evaluate.py's comparison table.
#
#     bash studies/cifar_resnet_depth.sh              # the whole study -> results/cifar_resnet_depth/
#     DRY_RUN=1 bash studies/cifar_resnet_depth.sh    # just print the commands
#     EPOCHS_SCALE=0.25 DEPTHS="20 56" PLAIN_DEPTHS="20 56" bash studies/cifar_resnet_depth.sh
#
# Published test error (%), ResNet paper table 6:
#
#     | ResNet-20 | ResNet-32 | ResNet-44 | ResNet-56 | ResNet-110 |
#     |-----------|-----------|-----------|-----------|------------|
#     | 8.75      | 7.51      | 7.17      | 6.97      | 6.43       |
#
# Recipe (paper, section 4.2): 164 epochs, batch 128, SGD lr 0.1, momentum 0.9, weight decay
# 1e-4, lr / 10 at epochs 82 and 123 (32k and 48k iterations), pad-4 crop + flip
# (--augment standard). The paper trains on 45k/5k and warms ResNet-110 up at lr 0.01 for ~400
# iterations; here all 50k images train and ResNet-110 gets a 1-epoch linear warm-up. With
# EPOCHS / EPOCHS_SCALE the milestones keep their place: 82/164 and 123/164 of the epochs.
# train.py leaves BatchNorm weights and biases out of the weight decay.
#
# Data: CIFAR-10 as JPEG folders, prepared once:
#   mkdir -p /tmp/cifar10-jpeg && tar -xzf cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
#
# Knobs (environment, default): DEPTHS ("20 32 44 56 110"), PLAIN_DEPTHS ("20 32 44 56"; empty:
#   none), DATASET_CIFAR (folder), DATA_CIFAR (/tmp/cifar10-jpeg), OUT (results/cifar_resnet_depth);
#   and those of common.sh: EPOCHS, EPOCHS_SCALE, EXTRA, EVAL_EXTRA, PYTHON, DRY_RUN.
# Runs: $OUT/resnet<depth>/, $OUT/plain<depth>/, then $OUT/comparison.md and $OUT/errors.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"
OUT=${OUT:-results/cifar_resnet_depth}
DEPTHS=${DEPTHS:-20 32 44 56 110}
PLAIN_DEPTHS=${PLAIN_DEPTHS-20 32 44 56}
DATASET_CIFAR=${DATASET_CIFAR:-folder}
DATA_CIFAR=${DATA_CIFAR:-/tmp/cifar10-jpeg}

E=$(epochs 164)
m1=$((E * 82 / 164)) m2=$((E * 123 / 164))
recipe=(--dataset "$DATASET_CIFAR" --data-dir "$DATA_CIFAR" --epochs "$E" --batch-size 128
        --optimizer sgd --lr 0.1 --momentum 0.9 --no-nesterov --weight-decay 1e-4
        --scheduler multistep --milestones $((m1 > 0 ? m1 : 1)) $((m2 > 0 ? m2 : 1)) --gamma 0.1
        --augment standard)

for d in $DEPTHS; do
    if [[ $d == 110 ]]; then
        run_train "resnet$d" --model "resnet$d" "${recipe[@]}" --warmup-epochs 1
    else
        run_train "resnet$d" --model "resnet$d" "${recipe[@]}"
    fi
done
for d in $PLAIN_DEPTHS; do
    run_train "plain$d" --model "resnet$d" --plain "${recipe[@]}"
done
compare

# Final-epoch training error (running average over the augmented epoch) and test error of every
# evaluated run in $OUT, this call's and earlier ones' (a study may be split over several calls).
if [[ $DRY_RUN != 1 ]]; then
    "$PYTHON" - "$OUT/errors.md" "$OUT"/*/eval.json <<'PY'
import csv, sys
from pathlib import Path
lines = ["| run | epochs | train error (%) | test error (%) |", "|---|--:|--:|--:|"]
runs = [Path(p).parent for p in sys.argv[2:]]
depth = lambda run: int("0" + "".join(filter(str.isdigit, run.name)))  # noqa: E731
for run in sorted(runs, key=lambda r: (r.name.startswith("plain"), depth(r))):
    with open(run / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    lines.append(f"| {run.name} | {last['epoch']} | {100 * (1 - float(last['train_acc'])):.2f} | "
                 f"{100 * (1 - float(last['test_top1'])):.2f} |")
Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
print("\n" + "\n".join(lines) + f"\nwrote {sys.argv[1]}")
PY
fi
