#!/usr/bin/env bash
# gpu_check.sh: prove every GPU path of this repo on one NVIDIA GPU in at most --minutes minutes.
#
#   bash gpu_check.sh [--out DIR] [--data-dir DIR|ARCHIVE.tar.gz] [--minutes N]
#
# Writes DIR/gpu_check.json (the machine; per part: passed/failed/skipped, reason, seconds, figures)
# and DIR/<part>.log; DIR defaults to results/gpu/<gpu name>/ (results/gpu/no-gpu/ without a GPU).
# Checkpoints, exports and images go to runs/gpu_check-<time>/ (git-ignored). --data-dir: an image
# folder (train/<class>/, test/<class>/) or a .tar.gz of one, unpacked once into data/<name>/;
# default: data/cifar10-jpeg/, data/cifar10-jpeg.tar.gz, ../shared/data/cifar10-jpeg.tar.gz.
# Each part has its own time limit (scaled by --minutes / 10) and the whole run stops starting parts
# when --minutes is spent; a part that needs an earlier part's output is skipped when it is missing.
# Without CUDA only the CPU parts run. What each part proves: docs/performance.md, "GPU: the
# prepared check". Exit 0; 1 when a part failed; 2 on bad usage.
# Smaller settings (the test suite's): --model NAME (resnet18), --epochs N (bf16 run 4; fp16 run
# half, at least 2), --limit-train N / --limit-test N (train.py's, every training; default all; the
# CPU-only training 2000 / 1000), --int8-max-drop POINTS (export.py's, 1). Environment: PYTHON (the
# interpreter, default python), GPU_CHECK_WORK (the work folder, default runs/gpu_check-<time>).
set -uo pipefail
export PYTHON=${PYTHON:-python} MODEL=resnet18 EPOCHS=4 LIMIT_TRAIN= LIMIT_TEST= INT8_MAX_DROP=1 MINUTES=10
export CMDLINE="bash gpu_check.sh $*" DATA_ARG= OUT=
usage() { echo "usage: bash gpu_check.sh [--out DIR] [--data-dir DIR|TAR.GZ] [--minutes N]: $1" >&2; exit 2; }
while (( $# )); do
  case $1 in
    -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    --out|--data-dir|--model|--int8-max-drop|--minutes|--epochs|--limit-train|--limit-test)
      (( $# >= 2 )) || usage "$1 needs a value" ;;&
    --out) OUT=$2 ;; --data-dir) DATA_ARG=$2 ;; --model) MODEL=$2 ;; --int8-max-drop) INT8_MAX_DROP=$2 ;;
    --minutes|--epochs|--limit-train|--limit-test)
      [[ $2 =~ ^[1-9][0-9]*$ ]] || usage "$1 must be a positive integer, got '$2'"
      v=${1#--}; v=${v//-/_}; printf -v "${v^^}" %s "$2" ;;
    *) usage "unknown argument '$1'" ;;
  esac
  shift 2
done
for v in OUT DATA_ARG; do [[ ${!v} && ${!v} != /* ]] && printf -v $v %s "$PWD/${!v}"; done  # before the cd
cd "$(dirname "$0")"

# Machine facts, figures and the JSON: this Python helper (`machine` and `data` import torch). A
# part's figures go to $WORK/$PART.figures.json; "error: ..." on stderr and exit 1 when they fail it.
export HELPER='
import csv, json, os, re, statistics, sys, time
from pathlib import Path
cmd, a, work, fig, bad = sys.argv[1], sys.argv[2:], Path(os.environ["WORK"]), {}, []
med = lambda v: statistics.median(v) if v else None
r3 = lambda x: None if x is None else round(x, 3)
def load(p):
    try: return json.loads(Path(p).read_text())
    except (OSError, ValueError): return None
def text(p): return Path(p).read_text(errors="replace") if Path(p).exists() else ""
def top1(p): return [x["top_k"][0]["class"] for x in load(p)["predictions"]]
def checks(log): return [l for l in text(log).splitlines() if l.startswith("check ")]
def agree(mine, ref, what):  # gross errors (wrong device memory, channel order) agree on far fewer
    same = sum(map(str.__eq__, mine, ref))
    fig.update(images=len(ref), top1_agreement=r3(same / max(len(ref), 1)), reference=what)
    if len(mine) != len(ref) or same < 0.95 * len(ref):
        bad.append(f"top-1 agrees with {what} on {same} of {len(ref)} images (< 95%)")
if cmd == "machine":  # -> machine.json; prints "<cuda available> <gpu slug>"
    import ctypes, platform, subprocess, importlib.metadata as md
    import torch, onnxruntime as ort, runtime
    def sh(*c):
        try: return (subprocess.run(c, capture_output=True, text=True, timeout=30).stdout.split("\n"))[0]
        except (OSError, subprocess.SubprocessError): return None
    def ver(p):
        try: return md.version(p)
        except md.PackageNotFoundError: return None
    def loads(lib):
        try: return bool(ctypes.CDLL(lib))
        except OSError: return False
    p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    m = dict(gpu=p and p.name, gpu_count=torch.cuda.device_count(), gpu_memory_bytes=p and p.total_memory,
             gpu_capability=p and f"{p.major}.{p.minor}", torch_cuda=torch.version.cuda,
             driver=sh("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
             cudnn=torch.backends.cudnn.version(), torch=torch.__version__, torchvision=ver("torchvision"),
             onnx=ver("onnx"), onnxruntime=ort.__version__, ort_providers=ort.get_available_providers(),
             tensorrt=[f"{n} {ver(n)}" for n in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13") if ver(n)],
             libnvinfer_so_10_loads=loads("libnvinfer.so.10"), python=platform.python_version(),
             cpu=runtime.cpu_name(), cpu_count=runtime.cpu_count(), os=platform.platform(),
             cmake=sh("cmake", "--version"), cxx=sh("c++", "--version"), commit=sh("git", "rev-parse",
             "HEAD"), uncommitted_changes=bool(sh("git", "status", "--porcelain")))
    (work / "machine.json").write_text(json.dumps(m, indent=1))
    print(str(p is not None).lower(), re.sub(r"[^a-z0-9]+", "-", (m["gpu"] or "no-gpu").lower()))
    sys.exit()
elif cmd == "data":  # FOLDER: decoded once (data.py caches it), 10 test images per class listed
    import data
    t = time.perf_counter()
    d = data.load_data("folder", a[0])
    fig.update(data_dir=a[0], train_images=len(d.train), test_images=len(d.test), classes=len(d.classes),
               image_size=d.image_size, load_seconds=r3(time.perf_counter() - t))
    split = Path(a[0], "test") if Path(a[0], "test").is_dir() else Path(a[0], "val")
    sample = [f"{f}\t{c.name}" for c in sorted(split.iterdir()) if c.is_dir() and not c.name.startswith(".")
              for f in sorted(c.iterdir())[:10] if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    (work / "sample.txt").write_text("\n".join(sample) + "\n")
    (work / "data_dir").write_text(a[0])
elif cmd == "train":  # RUN_DIR LOG
    rows = list(csv.DictReader(open(Path(a[0], "metrics.csv"))))
    ips, sec = ([float(r[k]) for r in rows] for k in ("images_per_second", "epoch_seconds"))
    peak = re.findall(r"peak GPU memory ([0-9.]+) GiB", text(a[1]))
    fig.update(epochs=len(rows), images_per_second_steady=r3(med(ips[1:])), images_per_second_epoch1=ips[0],
               epoch_seconds=sec, compile_seconds=r3(sec[0] - med(sec[1:])) if sec[1:] else None,
               peak_gpu_memory_gib=float(peak[-1]) if peak else None, test_top1=float(rows[-1]["test_top1"]),
               speed=(load(Path(a[0], "config.json")) or {}).get("speed"))
elif cmd == "evaluate":  # EVAL_JSON without per-class metrics and confusion matrix; what the timing ran
    fig.update({k: v for k, v in load(a[0]).items() if re.search("tf32|precision|layout|timing|latency", k)
                or k in ("n", "top1", "top5", "amp", "channels_last", "images_per_second", "device",
                          "torch")})
elif cmd == "export":  # PREFIX LOG: PREFIX[.fp16].benchmark.json (int8 rows sit in the fp32 one)
    fig.update({"benchmark" + f.replace(".", "_"): load(f"{a[0]}{f}.benchmark.json") for f in ("", ".fp16")},
               checks=checks(a[1]))
    m = re.search(r"top-1 fp32 ([0-9.]+)%, int8 ([0-9.]+)%.*agreement ([0-9.]+)%", text(a[1]))
    fig.update(zip(("top1_fp32", "top1_int8", "int8_fp32_agreement"), [float(x) / 100 for x in m.groups()])
               if m else {})
elif cmd == "images":  # SAMPLE OUTDIR K: K test images per class as PPM (cpp/classify) and PNG (predict.py)
    from PIL import Image
    per_class, i = {}, 0
    for f, c in (l.split("\t") for l in text(a[0]).splitlines()):
        per_class[c] = per_class.get(c, 0) + 1
        if per_class[c] <= int(a[2]):
            im, i = Image.open(f).convert("RGB"), i + 1
            for ext in ("ppm", "png"): im.save(Path(a[1], f"{i:03d}.{ext}"))
    sys.exit()
elif cmd == "predict":  # CUDA_JSON CPU_JSON SAMPLE SECONDS (of the CUDA call, process start included)
    gpu, provider = top1(a[0]), load(a[0])["provider"]
    truth = [l.split("\t")[1] for l in text(a[2]).splitlines()]
    agree(gpu, top1(a[1]), "predict.py --provider cpu")
    fig.update(provider=provider, top1=r3(sum(map(str.__eq__, gpu, truth)) / len(truth)), seconds=int(a[3]))
    bad += [] if "CUDA" in provider else [f"predict.py --provider cuda ran on {provider}"]
elif cmd == "classify":  # CLASSIFY_TSV PREDICT_JSON LOG
    agree([l.split("\t")[3] for l in text(a[0]).splitlines() if l.split("\t")[1] == "1"], top1(a[1]),
          "predict.py --provider cpu on the same pixels (PNG)")
    fig["checks"] = checks(a[2])
elif cmd == "assemble":  # -> stdout: gpu_check.json
    HOW = ("training: metrics.csv; images_per_second_steady = median of epochs 2..N (training pass "
           "only); compile_seconds = epoch 1 seconds - median of the later ones; peak memory: the done "
           "line. export: <stem>.benchmark.json, median/p90 of --repeats timed calls after --warmup, "
           "runtimes in turns. classic: bench.py JSON, interleaved rounds, warm-up (compile) apart.")
    num = lambda t: float(t.replace(",", "."))  # $EPOCHREALTIME, in any locale
    parts = [dict(name=n, status=s, reason=why or None, seconds=round(num(t1) - num(t0), 1), log=f"{n}.log",
                  figures=load(work / f"{n}.figures.json") or {})
             for n, s, t0, t1, why in (l.split("\t") for l in text(work / "parts.tsv").splitlines())]
    settings = {k.lower(): os.environ[k] or None for k in ("MODEL", "EPOCHS", "LIMIT_TRAIN", "LIMIT_TEST",
                                                             "INT8_MAX_DROP", "MINUTES")}
    print(json.dumps(dict(command=os.environ["CMDLINE"], date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                          work_dir=str(work), settings=settings, machine=load(work / "machine.json") or {},
                          how=HOW, parts=parts), indent=1))
    sys.exit()
if cmd == "bench": fig.update(load(a[0]))  # BENCH_JSON, whole
(work / (os.environ["PART"] + ".figures.json")).write_text(json.dumps(fig, indent=1))
if bad: sys.exit("error: " + "; ".join(bad))
'
helper() { "$PYTHON" -c "$HELPER" "$@"; }
need() {  # need FILE PART: skip this part (exit 3) when PART did not leave FILE
  [[ -e $1 ]] && return
  echo "needs $1 from $2 ($2: $(cat "$WORK/$2.status" 2>/dev/null || echo not run))" > "$WORK/$PART.skip"
  exit 3
}
data_dir() { need "$WORK/data_dir" data; cat "$WORK/data_dir"; }

# ---- the parts: each a `bash -e` under its own time limit, its output in $DIR/<part>.log
p_data() {
  local src=$DATA_ARG d
  if [[ -z $src ]]; then
    for src in data/cifar10-jpeg data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz ""; do
      [[ -e $src ]] && break; done
    [[ $src ]] || { echo "error: no --data-dir; no cifar10-jpeg(.tar.gz) in data/, ../shared/data/"; exit 1; }
  fi
  if [[ -f $src && ( $src == *.tar.gz || $src == *.tgz ) ]]; then
    d=data/$(basename "${src%.t*gz}")
    if [[ ! -d $d ]]; then  # unpacked beside, then renamed: a killed unpack is never taken for data
      echo "unpacking $src into $d"; rm -rf "$d.partial"; mkdir -p "$d.partial"
      tar -xzf "$src" -C "$d.partial"; mv "$d.partial" "$d"
    fi
  elif [[ -d $src ]]; then d=$src
  else echo "error: --data-dir $src: no such folder or .tar.gz archive"; exit 1; fi
  helper data "$(cd "$d" && pwd)"  # decoded now, into the folder's .cache: no training pays for it
}
train() {  # train LAUNCHER... FLAGS...: a run in $WORK/$PART and its figures
  local d; d=$(data_dir)
  "$@" --model "$MODEL" --dataset folder --data-dir "$d" --out "$WORK/$PART"
  helper train "$WORK/$PART" "$DIR/$PART.log"
}
limits() { echo ${LIMIT_TRAIN:+--limit-train $LIMIT_TRAIN} ${LIMIT_TEST:+--limit-test $LIMIT_TEST}; }
p_train_cpu() {
  train "$PYTHON" train.py --device cpu --epochs 1 --limit-train "${LIMIT_TRAIN:-2000}" \
    --limit-test "${LIMIT_TEST:-1000}"
}
p_train_bf16() { train "$PYTHON" train.py --device cuda --epochs "$EPOCHS" $(limits); }
p_train_fp16() {  # half the epochs, at least 2
  train "$PYTHON" train.py --device cuda --amp fp16 --epochs $((EPOCHS > 4 ? EPOCHS / 2 : 2)) $(limits)
}
p_torchrun_nccl() {  # DDP over NCCL, one process; compile off: the bf16 run proves it, and it costs a minute
  train "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 train.py --device cuda --epochs 1 \
    --compile off --limit-train "${LIMIT_TRAIN:-5000}" ${LIMIT_TEST:+--limit-test $LIMIT_TEST}
}
p_classic() {
  local d; d=$(data_dir)
  "$PYTHON" bench.py --device cuda --configs classic eager auto --models "$MODEL" --side-models \
    --dataset folder --data-dir "$d" --steps 60 --rounds 3 --warmup 10 --out "$WORK/bench.json"
  helper bench "$WORK/bench.json"
}
p_evaluate() {
  need "$BF16" train_bf16
  "$PYTHON" evaluate.py "$BF16" --device cuda --out "$WORK/evaluate"
  helper evaluate "$WORK/evaluate/eval.json"
}
export_onnx() {  # export_onnx PROVIDER: fp32 and --fp16 ONNX, each with --check and --benchmark
  local rc=0 f
  need "$BF16" train_bf16
  for f in "" .fp16; do
    "$PYTHON" export.py "$BF16" --device cuda --provider "$1" --check --benchmark --no-compile ${f:+--fp16} \
      --out "$WORK/export/$1$f.onnx" || rc=1
    # No TensorRT here: export.py's one error line says so; it becomes the reason for the skip.
    grep '^error: ' "$DIR/$PART.log" | grep -E 'TensorRT|Tensorrt|nvinfer' \
      | grep -m1 -E 'has no|cannot|missing|not found|not installed' > "$WORK/$PART.skip" && exit 3
  done
  helper export "$WORK/export/$1" "$DIR/$PART.log"
  exit $rc
}
p_export_cuda() { export_onnx cuda; }
p_export_tensorrt() { export_onnx tensorrt; }
p_int8() {  # int8 where it is int8: onnxruntime's CPU provider, against PyTorch on the CPU
  local p=train_cpu
  [[ $CUDA == true ]] && p=train_bf16
  need "$WORK/$p/best.pt" $p
  "$PYTHON" export.py "$WORK/$p/best.pt" --device cpu --provider cpu --int8 --check --benchmark --no-compile \
    --int8-max-drop "$INT8_MAX_DROP" --batch-sizes 1 64 --warmup 3 --repeats 20 --out "$WORK/int8/model.onnx"
  helper export "$WORK/int8/model" "$DIR/$PART.log"
}
p_aoti_cuda() {  # the .pt2 compiled for CUDA, run by cpp/classify --device cuda, against predict.py (CPU)
  local a=$WORK/aoti rc=0 torch_cmake
  need "$BF16" train_bf16; need "$WORK/sample.txt" data
  "$PYTHON" export.py "$BF16" --format all --device cuda --provider cuda --check --out "$a/best.onnx" || rc=1
  torch_cmake=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
  cmake -S cpp -B build/cpp -DCMAKE_PREFIX_PATH="$torch_cmake" && cmake --build build/cpp -j
  mkdir -p "$a/images"; helper images "$WORK/sample.txt" "$a/images" 3
  build/cpp/classify "$a/best.pt2" "$a"/images/*.ppm --device cuda | tee "$a/classify.tsv"
  "$PYTHON" predict.py "$a/best.onnx" "$a"/images/*.png --provider cpu --json > "$a/predict_cpu.json"
  helper classify "$a/classify.tsv" "$a/predict_cpu.json" "$DIR/$PART.log"
  exit $rc  # a failed --check above still let classify run
}
p_predict_cuda() {
  local files t=$SECONDS m=$WORK/export/cuda.onnx
  need "$m" export_cuda; need "$WORK/sample.txt" data
  mapfile -t files < <(cut -f1 "$WORK/sample.txt")
  "$PYTHON" predict.py "$m" "${files[@]}" --provider cuda --json > "$WORK/predict_cuda.json"
  t=$(( SECONDS - t ))
  "$PYTHON" predict.py "$m" "${files[@]}" --provider cpu --json > "$WORK/predict_cpu.json"
  helper predict "$WORK/predict_cuda.json" "$WORK/predict_cpu.json" "$WORK/sample.txt" "$t"
}

# ---- the runner
record() {  # record PART STATUS T0 REASON
  echo "$2" > "$WORK/$1.status"
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$EPOCHREALTIME" "$(tr '\t\n' '  ' <<< "$4" | sed 's/ *$//')" \
    >> "$WORK/parts.tsv"
  echo "[${SECONDS}s] $1: $2${4:+ ($4)}"
}
skip() { echo "skipped: $2" > "$DIR/$1.log"; record "$1" skipped "$EPOCHREALTIME" "$2"; }
why() {  # why LOG: the line that says why a part failed
  grep -m1 '^error' "$1" || grep -E 'FAIL|Error' "$1" | tail -n1 | grep . || tail -n1 "$1"
}
run() {  # run PART SECONDS [cuda|nocuda]: p_PART under min(SECONDS x --minutes / 10, the time left)
  local limit=$(( $2 * MINUTES / 10 )) left=$(( MINUTES * 60 - 10 - SECONDS )) t0=$EPOCHREALTIME rc
  export PART=$1
  case ${3:-}:$CUDA in
    cuda:false) skip "$1" "no CUDA device: torch.cuda.is_available() is False"; return ;;
    cuda:) skip "$1" "no CUDA information: the machine part failed"; return ;;
    nocuda:true) skip "$1" "a CUDA device is present: the CPU parts use train_bf16's checkpoint"; return ;;
  esac
  (( left >= 15 )) || { skip "$1" "out of time: the --minutes $MINUTES budget is spent"; return; }
  (( limit < left )) || limit=$left
  # In the background, so that Ctrl-C reaches the trap below at once (timeout runs in a group of its own).
  timeout -k 10 "$limit" bash -e -o pipefail -c "p_$1" > "$DIR/$1.log" 2>&1 & TIMEOUT_PID=$!
  wait $TIMEOUT_PID; rc=$?
  case $rc in
    0) record "$1" passed "$t0" "" ;;
    3) record "$1" skipped "$t0" "$(cat "$WORK/$1.skip")" ;;
    124|137) record "$1" failed "$t0" "timed out after ${limit}s" ;;
    *) record "$1" failed "$t0" "$(why "$DIR/$1.log" | cut -c1-400)" ;;
  esac
}
trap 'kill ${TIMEOUT_PID:-} 2>/dev/null; echo "interrupted in part $PART" >&2; exit 130' INT TERM

export WORK=${GPU_CHECK_WORK:-$PWD/runs/gpu_check-$(date +%Y%m%d-%H%M%S)} PART=machine CUDA= SLUG=unknown
export BF16=$WORK/train_bf16/best.pt
mkdir -p "$WORK"
t0=$EPOCHREALTIME
read -r CUDA SLUG < <(timeout 120 "$PYTHON" -c "$HELPER" machine 2> "$WORK/machine.err")
export DIR=${OUT:-results/gpu/${SLUG:-unknown}}
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd) || exit 1
cat "$WORK/machine.json" "$WORK/machine.err" > "$DIR/machine.log" 2>/dev/null
if [[ $CUDA ]]; then record machine passed "$t0" ""
else record machine failed "$t0" "$(why "$DIR/machine.log")"; fi
export -f helper need data_dir train limits export_onnx $(compgen -A function p_)
run data 120
run train_cpu 120 nocuda
run train_bf16 150 cuda
run evaluate 45 cuda
run export_cuda 90 cuda
run predict_cuda 45 cuda
run export_tensorrt 120 cuda
run int8 90
run aoti_cuda 150 cuda
run train_fp16 100 cuda
run torchrun_nccl 60 cuda
run classic 90 cuda
helper assemble > "$DIR/gpu_check.json.partial" && mv -f "$DIR/gpu_check.json.partial" "$DIR/gpu_check.json"
echo "wrote $DIR/gpu_check.json and the parts' logs beside it (work files: $WORK)"
! grep -q "	failed	" "$WORK/parts.tsv"
