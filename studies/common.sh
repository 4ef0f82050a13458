# Helpers sourced by the study scripts in this folder (not run on its own).
#
#   run_train NAME ARGS...  prints and runs `python train.py ARGS... $EXTRA --out $OUT/NAME`,
#                           its output also kept in $OUT/NAME/train.log; with SEEDS="0 1 2",
#                           once per seed: `--seed S --out $OUT/NAME-seedS`. A run whose train.log
#                           says "done:" is skipped and an interrupted one resumed from its
#                           last.pt, so a study can simply be started again. A run that diverges
#                           (train.py exits 1 with a "non-finite" loss) is appended to
#                           $OUT/diverged.txt and left out of the table; any other failure stops
#                           the study.
#   compare                 prints and runs `python evaluate.py <best.pt of each run> --out $OUT
#                           $EVAL_EXTRA`: eval.json, confusion matrix... in each run dir, and
#                           comparison.csv / comparison.md (the printed table) in $OUT.
#                           (evaluate.py makes a table from two checkpoints up; a single run
#                           is evaluated into its own dir.)
#   epochs N                $EPOCHS when set, else N x $EPOCHS_SCALE rounded (at least 1).
#
# Knobs shared by every study (environment variables):
#   OUT           results root (default results/<study>)
#   SEEDS         repeat every run once per seed (e.g. "0 1 2"; run dirs get -seed<S>); unset:
#                 one run per configuration with train.py's default seed, dirs without a suffix
#   EPOCHS        one epoch count for every run; EPOCHS_SCALE (default 1) scales the study's own
#   EXTRA         flags appended to every train.py call (they win over the study's, e.g.
#                 "--limit-train 256 --limit-test 64 --device cpu" or "--compile --channels-last";
#                 split at spaces, no quoting)
#   EVAL_EXTRA    flags appended to the evaluate.py call (e.g. "--no-timing")
#   PYTHON        interpreter (default python)
#   DRY_RUN=1     print the commands without running them

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
EPOCHS=${EPOCHS:-}
SEEDS=${SEEDS:-}
EPOCHS_SCALE=${EPOCHS_SCALE:-1}
DRY_RUN=${DRY_RUN:-0}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
read -r -a EVAL_ARGS <<< "${EVAL_EXTRA:-}"
CKPTS=()  # best.pt of every run that finished

show() {  # print a command, shell-quoted
    local s
    printf -v s '%q ' "$@"
    echo "+ ${s% }"
}

epochs() {
    if [[ -n $EPOCHS ]]; then
        echo "$EPOCHS"
    else
        awk -v n="$1" -v s="$EPOCHS_SCALE" 'BEGIN { e = int(n * s + 0.5); print (e < 1 ? 1 : e) }'
    fi
}

run_train() {
    local name=$1 seed
    shift
    if [[ -z $SEEDS ]]; then
        run_one "$name" "$@"
        return
    fi
    for seed in $SEEDS; do
        run_one "$name-seed$seed" "$@" --seed "$seed"
    done
}

run_one() {
    local name=$1 dir=$OUT/$1
    shift
    local cmd=("$PYTHON" "$REPO/train.py" "$@" "${EXTRA_ARGS[@]}" --out "$dir")
    if grep -qsxF "$name" "$OUT/diverged.txt"; then
        echo "# $name: diverged before (in $OUT/diverged.txt), skipped"
        return
    fi
    if grep -qs '^done:' "$dir/train.log"; then
        echo "# $name: finished before, skipped"
        CKPTS+=("$dir/best.pt")
        return
    fi
    if [[ -f $dir/last.pt ]]; then
        cmd+=(--resume "$dir/last.pt")
    fi
    show "${cmd[@]}"
    if [[ $DRY_RUN == 1 ]]; then
        CKPTS+=("$dir/best.pt")
        return
    fi
    mkdir -p "$dir"
    if "${cmd[@]}" 2>&1 | tee -a "$dir/train.log"; then
        CKPTS+=("$dir/best.pt")
    elif [[ $(tail -n 1 "$dir/train.log") == *non-finite* ]]; then
        echo "$name" >> "$OUT/diverged.txt"
        echo "# $name: diverged, recorded in $OUT/diverged.txt; going on"
    else
        echo "error: $name failed; see $dir/train.log" >&2
        exit 1
    fi
}

compare() {
    if (( ${#CKPTS[@]} == 0 )); then
        echo "error: no run finished, nothing to compare" >&2
        exit 1
    fi
    local out=$OUT
    if (( ${#CKPTS[@]} == 1 )); then
        out=$(dirname "${CKPTS[0]}")
    fi
    local cmd=("$PYTHON" "$REPO/evaluate.py" "${CKPTS[@]}" --out "$out" "${EVAL_ARGS[@]}")
    show "${cmd[@]}"
    if [[ $DRY_RUN == 1 ]]; then
        return
    fi
    "${cmd[@]}"
    if [[ -s $OUT/diverged.txt ]]; then
        echo "diverged (not in the table): $(tr '\n' ' ' < "$OUT/diverged.txt")"
    fi
}
