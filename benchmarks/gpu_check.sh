#!/usr/bin/env bash
# One-call GPU check for a lent H100/H200 machine (torch 2.11 cu130, triton 3.6, transformers 5.17, nvcc,
# cmake/ninja/pybind11 in the image; no network, no flash-attn). From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# (device tool: run(command="bash benchmarks/gpu_check.sh", timeout_s=600), carry=[".whl"] for FlashInfer).
#
# Steps (each with its own time limit, all inside GPU_CHECK_BUDGET_S, default 540 s: the device tool's
# 600 s per call less the machine's start; the limits add up to more, so a full run is cut by the budget,
# latest steps first: run the rest in a second call with GPU_CHECK_STEPS):
#   env        nvidia-smi, interpreter and package versions
#   flashinfer optional: installs .whl/flashinfer*.whl when carried (carry=[".whl"]); FlashInfer then JIT-
#              compiles its sampling module with the machine's nvcc on first use (about a minute). .whl/ is
#              git-ignored; to make the 5.7 MB pure-Python wheel here (as ../shared/README.md describes):
#                pip download --no-deps flashinfer-python==0.3.1 -d /tmp/fi &&
#                pip wheel --no-deps --no-build-isolation /tmp/fi/flashinfer_python-0.3.1.tar.gz -w .whl
#   install    pip install --no-build-isolation --no-deps --no-index -e .   (CPU + CUDA kernels, sm_90)
#   tests      pytest on CUDA, tests/ops and tests/engine only (graph-vs-eager, Triton kernels natively; the
#              rest runs on CPU in CI), with -n auto when pytest-xdist is importable; --maxfail=25 so one
#              failure does not hide the others
#   tp         the tensor-parallel code path as a one-rank NCCL group on this GPU (RAST_FORCE_PG=1): (1) pytest
#              tests/engine/test_engine_cuda.py (graph == eager, the oracle, no host sync: now through the
#              collectives; 30 s), (2) bench_decode.py --tensor-parallel-size 1 --systems engine, Qwen2.5-7B
#              + 2 x 1.5B, B=1, 8, 32 new tokens (35 s), to set against the decode step's plain engine at the
#              same B: what the collectives (161 per step at TP 1) and the token broadcast cost
#              -> decode_tp1.json. Its fused-decode Triton kernels land in the cache the decode step then
#              reuses, which is why the decode step's limit is 30 s shorter than before
#   serving    benchmarks/bench_serving.py, Qwen2.5-7B + 2 x 1.5B, 96 long-tailed requests: the continuous paged
#              engine against the static engine at equal KV memory, graph == eager is in the tests step;
#              per-step time at B=8 (the static baseline from git is skipped there: no .git)  -> serving.json
#   decode     benchmarks/bench_decode.py, Qwen2.5-7B + 2 x 1.5B, B=1, 8, 32: the engine (fused decode),
#              the engine with transformers' forward (decode kernel / SDPA), the engine with two expert pairs
#              (engine_2pairs: + the deltas of Qwen2.5-0.5B, five models; the step's limit is 30 s longer
#              for it, a guess: not yet timed on a GPU),
#              base alone, then the eager peer loop (the pre-project anchors measured it already, so it comes
#              last) -> decode.json
#   profile    benchmarks/profile_decode_step.py: sdpa, decode kernel, fused decode -> profile_*.json
#              (written after each implementation)
#   sampler    benchmarks/bench_sampler.py, full grid x K = 1, 2, 3 expert pairs, V = 152064 first (the
#              issue's rows: a run cut by its limit keeps them)     -> sampler.json, sampler.png
#   attention  benchmarks/bench_decode_attention.py                  -> decode_attention.json
# The order is the priority: what is still unmeasured comes first, so a run cut by the budget keeps it.
# Run a subset with GPU_CHECK_STEPS="install sampler" (install is needed for the compiled kernels).
#
# Time limits send SIGINT first (pytest then prints its failures and writes the junit XML, a benchmark
# keeps the JSON it has checkpointed), and SIGKILL 30 s later if the step is still running.
#
# Dry run, no GPU needed (tests/test_build.py runs it): GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
# checks this script's syntax, that every step's function exists, that every script it runs exists and
# parses the options given to it here (argparse only, nothing runs), and that the pytest folders exist.
#
# Everything lands under $OUT, flat: gpu_check.log (all output), summary.txt (one line per step call:
# exit code and seconds), the JSON/PNG results as they are produced, and results.tar.gz (per-step logs,
# junit XML, every JSON written). Every step at once would make 10 files, 2 more than the device tool
# brings back: the tarball has them all. Results are copied after each step, so a step that is killed
# does not lose the earlier ones.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
STEPS=${GPU_CHECK_STEPS:-"env flashinfer install tests tp serving decode profile sampler attention"}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[ "$DRY_RUN" = 0 ] && DRY_RUN=""
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME LIMIT_S CMD...: run CMD with a time limit (cut to what is left of the budget), log it, record rc;
# a NAME given to several calls runs them all (their logs append to one file)
step() {
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    if [ -n "$DRY_RUN" ]; then
        dry_step "$name" "$@"
        return 0
    fi
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
        timeout -s INT -k 30 "$limit" bash -c "$*" 2>&1 | tee -a "$WORK/$name.log"
    else
        timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee -a "$WORK/$name.log"
    fi
    local rc=${PIPESTATUS[0]}
    local note=""
    ((rc == 124 || rc == 137)) && note=" (timed out)"
    echo "== $name: rc=$rc$note after $(($(date +%s) - t))s"
    printf '%-10s rc=%-4s %4ss%s\n' "$name" "$rc" "$(($(date +%s) - t))" "$note" >>"$SUMMARY"
}

# dry_step NAME CMD...: check CMD without running it (GPU_CHECK_DRY_RUN=1); scripts are queued for one
# argparse-only pass at the end (one Python start for all of them). CMD may start with env NAME=VALUE...:
# the command after them is checked, a queued script parsed with those variables set
dry_step() {
    local name=$1
    shift
    local problem="" envs=()
    if [ "$1" = env ]; then
        shift
        while [[ "${1:-}" == [A-Za-z_]*=* ]]; do
            envs+=("$1")
            shift
        done
    fi
    if declare -F "$1" >/dev/null; then
        :
    elif [ "$1" = "$PY" ] && [ "${2:-}" = "-m" ] && [ "${3:-}" = "pytest" ]; then
        local a value_next=""
        for a in "${@:4}"; do # the paths among pytest's arguments must exist (a typo would test nothing)
            if [ -n "$value_next" ]; then
                value_next=""
            else
                case "$a" in -p | -n | -k | -m) value_next=1 ;; -*) ;; *) [ -e "$a" ] || problem="$problem missing $a" ;; esac
            fi
        done
    elif [ "$1" = "$PY" ]; then
        if [ -f "${2:-}" ]; then
            (IFS=$'\x1f'; printf '%s\n' "${envs[*]}${envs:+$'\x1f'}${*:2}") >>"$WORK/dry_run_scripts"
        else
            problem="missing script ${2:-}"
        fi
    else
        command -v "$1" >/dev/null || problem="unknown command $1"
    fi
    if [ -n "$problem" ]; then
        echo "== $name: DRY RUN FAILED:$problem"
        printf '%-10s rc=1    dry run:%s\n' "$name" "$problem" >>"$SUMMARY"
    else
        printf '%-10s rc=0    dry run\n' "$name" >>"$SUMMARY"
    fi
}

# parse each queued script's options with its own argparse parser and stop there: argparse's
# parse_args is wrapped to raise once it has parsed (type checks and unknown options included), so
# nothing runs
dry_parse() {
    [ -s "$WORK/dry_run_scripts" ] || return 0
    "$PY" - "$WORK/dry_run_scripts" >>"$SUMMARY" <<'PYEOF'
import argparse, io, os, runpy, sys
from contextlib import redirect_stderr, redirect_stdout


class Parsed(Exception):
    pass


original = argparse.ArgumentParser.parse_args


def parse_then_stop(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed


argparse.ArgumentParser.parse_args = parse_then_stop
environ = dict(os.environ)
for line in open(sys.argv[1]):
    fields = line.rstrip("\n").split("\x1f")
    argv = fields[next(i for i, f in enumerate(fields) if "=" not in f or os.path.exists(f)):]  # after NAME=VALUEs
    os.environ.clear()
    os.environ.update(environ, **dict(f.split("=", 1) for f in fields[:len(fields) - len(argv)]))
    sys.argv, here = argv, os.path.dirname(os.path.abspath(argv[0]))
    sys.path.insert(0, here)  # as when the script is run: its folder first (benchmarks import each other)
    err, status = io.StringIO(), None
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            runpy.run_path(argv[0], run_name="__main__")
        status = "ran to its end without parsing options"
    except Parsed:
        pass
    except SystemExit as exc:
        status = f"exit {exc.code}: {err.getvalue().strip()[-300:]}"
    except Exception as exc:
        status = f"{type(exc).__name__}: {exc}"
    finally:
        sys.path.remove(here)
    print(f"{'parse':<10} rc={0 if status is None else 1:<4} {' '.join(fields)}" + ("" if status is None else f": {status}"))
PYEOF
}

# copy result files produced so far to $OUT (flat names; the tarball keeps the rest)
collect() {
    local f
    for f in "$WORK"/sampler.json "$WORK"/sampler.png "$WORK"/decode.json "$WORK"/decode_attention.json \
        "$WORK"/serving.json "$WORK"/profile/profile_*.json; do
        [ -f "$f" ] && cp "$f" "$OUT/"
    done
    [ -f "$WORK/tp1/decode.json" ] && cp "$WORK/tp1/decode.json" "$OUT/decode_tp1.json"
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

# pytest_args [NAME]: the options of a pytest step, its junit XML written to $WORK/NAME.xml (default junit)
pytest_args() {
    local a="--maxfail=25 -q -p no:cacheprovider --durations=15 --junitxml=$WORK/${1:-junit}.xml"
    "$PY" -c "import pytest_timeout" 2>/dev/null && a="$a --timeout=120"
    "$PY" -c "import xdist" 2>/dev/null && a="$a -n auto"
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
    # only the folders that exercise CUDA: the rest is CPU code that CI covers
    step tests 150 "$PY" -m pytest tests/ops tests/engine $(pytest_args)
    # shellcheck disable=SC2046
    step tp 30 env RAST_FORCE_PG=1 "$PY" -m pytest tests/engine/test_engine_cuda.py $(pytest_args junit_tp)
    step tp 35 env RAST_FORCE_PG=1 "$PY" benchmarks/bench_decode.py --trio qwen --tensor-parallel-size 1 \
        --systems engine --batch 1 8 --new-tokens 32 --repeats 1 --out "$WORK/tp1"
    collect
    step serving 110 "$PY" benchmarks/bench_serving.py --trio qwen --requests 96 --max-batch 32 --prompt-len 64 \
        --mean-new 64 --max-new 448 --kv-tokens 4096 --step-batch 8 --systems decode_step continuous static --out "$WORK"
    collect
    step decode 240 "$PY" benchmarks/bench_decode.py --trio qwen --batch 1 8 32 --repeats 2 --peer-new-tokens 48 \
        --out "$WORK"
    collect
    step profile 100 "$PY" benchmarks/profile_decode_step.py --out "$WORK/profile"
    collect
    local sampler_limit=150
    [ -d /tmp/site/flashinfer ] && sampler_limit=240 # FlashInfer JIT-compiles its sampling module on first use (~1 min)
    step sampler "$sampler_limit" "$PY" benchmarks/bench_sampler.py --full --vocab 152064 128256 32000 --pairs 1 2 3 \
        --budget-s 0.2 --out "$WORK"
    collect
    step attention 60 "$PY" benchmarks/bench_decode_attention.py --out "$WORK"
    collect
    if [ -n "$DRY_RUN" ]; then
        dry_parse
    else
        nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv || true
    fi
    echo "gpu_check: done after $(($(date +%s) - T0))s"
    echo "---- summary"
    cat "$SUMMARY"
}

if [ -n "$DRY_RUN" ]; then
    bash -n "$0" || printf '%-10s rc=1    bash -n failed\n' syntax >>"$SUMMARY"
fi
main 2>&1 | tee "$OUT/gpu_check.log"
collect
tar czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null || true
ls -la "$OUT"
# exit non-zero when any step failed, so the caller sees it at once
! grep -q 'rc=[1-9]' "$SUMMARY"
