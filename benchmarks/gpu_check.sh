#!/usr/bin/env bash
# One-call GPU check for a lent H100/H200 machine (torch 2.11 cu130, triton 3.6, transformers 5.17, nvcc,
# cmake/ninja/pybind11 in the image; no network, no flash-attn). From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# (device tool: run(command="bash benchmarks/gpu_check.sh", timeout_s=600), carry=[".whl"] for FlashInfer).
#
# Steps (each with its own time limit, all inside GPU_CHECK_BUDGET_S, default 540 s: the device tool's
# 600 s per call less the machine's start):
#   env        nvidia-smi, interpreter and package versions
#   flashinfer optional: installs .whl/flashinfer*.whl when carried (carry=[".whl"]); FlashInfer then JIT-
#              compiles its sampling module with the machine's nvcc on first use (about a minute). .whl/ is
#              git-ignored; to make the 5.7 MB pure-Python wheel here (as ../shared/README.md describes):
#                pip download --no-deps flashinfer-python==0.3.1 -d /tmp/fi &&
#                pip wheel --no-deps --no-build-isolation /tmp/fi/flashinfer_python-0.3.1.tar.gz -w .whl
#   install    pip install --no-build-isolation --no-deps --no-index -e .   (CPU + CUDA kernels, sm_90)
#   tests      pytest on CUDA, tests/engine and tests/ops first (graph-vs-eager, Triton kernels natively),
#              then the rest; --maxfail=25 so one failure does not hide the others
#   decode     benchmarks/bench_decode.py, Qwen2.5-7B + 2 x 1.5B, B=1, 8, 32: the engine (fused decode),
#              the engine with transformers' forward (decode kernel / SDPA), the peer loop, base alone
#                                                                    -> decode.json
#   profile    benchmarks/profile_decode_step.py: sdpa, decode kernel, fused decode -> profile_*.json
#   sampler    benchmarks/bench_sampler.py, full grid                -> sampler.json, sampler.png
#   attention  benchmarks/bench_decode_attention.py                  -> decode_attention.json
# The order is the priority: what is still unmeasured comes first, so a run cut by the budget keeps it.
# Run a subset with GPU_CHECK_STEPS="install sampler" (install is needed for the compiled kernels).
#
# Everything lands under $OUT, flat, at most 8 files: gpu_check.log (all output), summary.txt (one line
# per step: exit code and seconds), the JSON/PNG results as they are produced, and results.tar.gz
# (per-step logs, junit XML, every JSON written). Results are copied after each step, so a step that is
# killed does not lose the earlier ones.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
STEPS=${GPU_CHECK_STEPS:-"env flashinfer install tests decode profile sampler attention"}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME LIMIT_S CMD...: run CMD with a time limit (cut to what is left of the budget), log it, record rc
step() {
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((BUDGET_S - ($(date +%s) - T0) - 15))
    if ((left < 20)); then
        echo "== $name: skipped, the budget is used up"
        printf '%-10s skipped (budget)\n' "$name" >>"$SUMMARY"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s, t=$(($(date +%s) - T0))s): $*"
    local t=$(date +%s)
    if declare -F "$1" >/dev/null; then # a function of this script: run it in a child bash (exported below)
        timeout -k 10 "$limit" bash -c "$*" 2>&1 | tee "$WORK/$name.log"
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    fi
    local rc=${PIPESTATUS[0]}
    local note=""
    ((rc == 124 || rc == 137)) && note=" (timed out)"
    echo "== $name: rc=$rc$note after $(($(date +%s) - t))s"
    printf '%-10s rc=%-4s %4ss%s\n' "$name" "$rc" "$(($(date +%s) - t))" "$note" >>"$SUMMARY"
}

# copy result files produced so far to $OUT (flat names; the tarball keeps the rest)
collect() {
    local f
    for f in "$WORK"/sampler.json "$WORK"/sampler.png "$WORK"/decode.json "$WORK"/decode_attention.json \
        "$WORK"/profile/profile_*.json; do
        [ -f "$f" ] && cp "$f" "$OUT/"
    done
    return 0
}

env_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
        --format=csv || true
    command -v nvcc && nvcc --version | tail -2
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for pkg in ("triton", "transformers", "tokenizers", "pybind11", "cmake", "ninja", "setuptools", "pytest",
            "pytest-benchmark", "pytest-timeout", "matplotlib", "flashinfer-python"):
    try:
        print(f"  {pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"  {pkg} MISSING")
EOF
}

install_flashinfer() {
    local whl
    whl=$(ls .whl/flashinfer*.whl 2>/dev/null | head -1)
    if [ -z "$whl" ]; then
        echo "no .whl/flashinfer*.whl carried: FlashInfer rows are skipped"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl"
}

install_pkg() {
    # Editable: the tests run from the checkout, where `python -m pytest` puts ./rast_kernels first on
    # sys.path, so the compiled _C must be built into the checkout (a plain `pip install .` would put it
    # in site-packages, shadowed there by the source tree).
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . &&
        "$PY" -m rast_kernels info
}

pytest_args() {
    local a="--maxfail=25 -q -p no:cacheprovider --durations=15 --junitxml=$WORK/junit.xml"
    "$PY" -c "import pytest_timeout" 2>/dev/null && a="$a --timeout=120"
    echo "$a"
}

export PY WORK
export -f env_info install_flashinfer install_pkg

main() {
    echo "gpu_check: $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET_S}s; steps: $STEPS; work dir $WORK"
    step env 30 env_info
    step flashinfer 60 install_flashinfer
    [ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    step install 240 install_pkg
    # shellcheck disable=SC2046
    # the files that exercise CUDA first, so a run cut by the time limit still covers them
    step tests 150 "$PY" -m pytest tests/engine tests/ops tests $(pytest_args)
    step decode 240 "$PY" benchmarks/bench_decode.py --trio qwen --batch 1 8 32 --repeats 2 --peer-new-tokens 48 \
        --out "$WORK"
    collect
    step profile 100 "$PY" benchmarks/profile_decode_step.py --out "$WORK/profile"
    collect
    local sampler_limit=150
    [ -d /tmp/site/flashinfer ] && sampler_limit=240 # FlashInfer JIT-compiles its sampling module on first use (~1 min)
    step sampler "$sampler_limit" "$PY" benchmarks/bench_sampler.py --full --budget-s 0.2 --out "$WORK"
    collect
    step attention 60 "$PY" benchmarks/bench_decode_attention.py --out "$WORK"
    collect
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv || true
    echo "gpu_check: done after $(($(date +%s) - T0))s"
    echo "---- summary"
    cat "$SUMMARY"
}

main 2>&1 | tee "$OUT/gpu_check.log"
collect
tar czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null || true
ls -la "$OUT"
# exit non-zero when any step failed, so the caller sees it at once
! grep -q 'rc=[1-9]' "$SUMMARY"
