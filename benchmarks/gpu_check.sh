#!/usr/bin/env bash
# One-call GPU check for a lent H100/H200 machine (torch 2.11 cu130, triton 3.6, transformers 5.17, nvcc,
# cmake/ninja/pybind11 in the image; no network, no flash-attn). From the repository root:
#
#     GPU_CHECK_BUDGET_S=540 bash benchmarks/gpu_check.sh
#
# Device tool: run(command="GPU_CHECK_BUDGET_S=540 bash benchmarks/gpu_check.sh", timeout_s=600).
# GPU_CHECK_BUDGET_S (default 540): the seconds this run may take. The caller sets it from the device tool's
# status: budget_left_s less the machine's start (1-2 min), and at most the 600 s one call may run less the
# transfers (60 s). A fresh session: 900 s left - ~120 s start = 780, capped at 600 - 60 -> 540.
#
# The steps run in order of value, each under its own time limit, and the limits (ESTIMATES, see below) add up
# to the default budget, so a run at the default budget reaches every step; with a smaller budget (or when a
# step overruns) the last steps are skipped ("skipped (budget)" in summary.txt). The ordered plan, each step's
# limit and whether it fits is printed first. Every step writes its results before the next starts, and
# results.tar.gz is rebuilt after every step, so a call cut short keeps everything finished before the cut.
#
#   step       limit  what it runs                                            -> what it records
#   env         15 s  nvidia-smi, nvcc, interpreter and package versions       -> gpu_check.log
#   install    100 s  pip install --no-build-isolation --no-deps --no-index -e . (the CUDA extension for sm_90);
#                     on failure `setup.py build_ext --inplace`, and when the package still does not import from
#                     an install the later steps run from the source tree (PYTHONPATH=$PWD, with or without _C)
#   selftest    60 s  python -m rast_kernels selftest (the first measuring step: every Triton kernel against its
#                     reference at Qwen2.5-7B/1.5B shapes and V=152064, the toy trio's graph == eager, the
#                     sampler's distribution)                              -> selftest.json
#   graph       60 s  pytest tests/engine/test_engine_cuda.py alone, one process (no xdist: each kernel compiled
#                     once), no --maxfail: graph == eager, the oracle, no host sync -> graph.xml
#   sampler     40 s  bench_sampler.py, V=152064 only, bf16, B=1..256, 1 and 2 expert pairs: the headline
#                     kernel numbers against the reference and the HF chain -> sampler.json, sampler.png
#   decode      50 s  bench_decode.py, Qwen2.5-7B + 2 x 1.5B, B=1, 8: engine (fused), engine with transformers'
#                     forward, the peer loop, the floor                   -> decode.json
#   serving     45 s  bench_serving.py, 48 long-tailed requests: continuous paged vs static engine, per-step
#                     time at B=8 (the static baseline from git is skipped: no .git there) -> serving.json
#   engine      35 s  gpu_engine_checks.py: the 7B + 2 x 1.5B engine's own KV pool (kv_cache_tokens,
#                     pool_sizing: the measured peak), step() under set_sync_debug_mode("error") over a small
#                     serving workload                                     -> engine_checks.json
#   speculative 30 s  bench_speculative.py on the GPU: one speculative round (k = 4) against 5 plain steps and the
#                     base's 5-token forward against its 1-token forward, Qwen2.5-7B + 2 x 1.5B, B=1; then the
#                     toy trio end to end (plain RAST, speculative, the base alone) -> speculative.json
#   attention   20 s  bench_decode_attention.py, 7B and 1.5B heads, B=1, 8, 32, L=1024, 4096 -> decode_attention.json
#   tp       20+20 s  the tensor-parallel path as a one-rank NCCL group (RAST_FORCE_PG=1): test_engine_cuda.py's
#                     continuous-batching graph == eager and no-host-sync tests through the collectives, then
#                     bench_decode.py --tensor-parallel-size 1 (B=1, 8: what 161 collectives per step cost)
#                                                                          -> tp.xml, tp1/decode.json
#   cext        10 s  pytest tests/test_build.py -k cuda: the CUDA extension built, its Philox on the GPU
#                                                                          -> cext.xml
#   ops       25+ s   pytest tests/ops on CUDA (GPU-only tolerances: bf16 rope bit-exact, rms_norm 2 ulps, ...;
#                     rope and rms_norm first), no --maxfail; the last step takes whatever the budget has left
#                                                                          -> ops.xml
#   optional (not in the default plan: GPU_CHECK_STEPS="install flashinfer sampler" etc.):
#   flashinfer  60 s  installs .whl/flashinfer*.whl when carried (carry=[".whl"]); its sampler is then a
#                     bench_sampler column (FlashInfer JIT-compiles it with nvcc on first use, about a minute);
#                     to make the wheel here: pip download --no-deps flashinfer-python==0.3.1 -d /tmp/fi &&
#                     pip wheel --no-deps --no-build-isolation /tmp/fi/flashinfer_python-0.3.1.tar.gz -w .whl
#   profile     60 s  profile_decode_step.py: sdpa, decode kernel, fused decode -> profile/profile_*.json
#
# The limits are estimates, not measurements (nothing has run on a GPU yet): Triton compiles ~0.9 s per kernel
# specialisation on a cold GPU (the op and engine tests launch about 413 of them; the selftest about 30);
# test_engine_cuda.py takes ~30 s warm; the install compiles 4 C++/CUDA files against torch's headers; the
# benchmarks build random-init 7B + 2 x 1.5B trios on the GPU in seconds (benchmarks/models.py) and were cut to
# fit. Replace them with the measured times (summary.txt) after the first run.
# GPU_CHECK_STEPS="install selftest sampler" runs a subset (install is needed for the compiled extension).
#
# Time limits send SIGINT (pytest then prints its failures and writes the junit XML, a benchmark keeps the JSON
# it has checkpointed), and SIGKILL 10 s later if the step is still running.
#
# Dry run, no GPU needed (tests/test_build.py runs it): GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh prints
# the ordered plan with each step's limit and checks that the limits plus the final reserve fit the budget
# (summary.txt line "plan"), this script's syntax, that every step's function exists, that every script it runs
# exists and parses the options given to it here (argparse only, nothing runs), and that the pytest paths exist.
#
# Everything lands under $OUT, flat: gpu_check.log (all output), summary.txt (the plan's fit, then one line per
# step call: exit code and seconds), selftest.json, sampler.json, decode.json, engine_checks.json,
# speculative.json as they are produced, and results.tar.gz (every step's log, the junit XML, every JSON and PNG written). The
# device tool brings back 8 files: these are the 8.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
RESERVE_S=10 # kept back from the budget for the final archive and the listing
STEPS=${GPU_CHECK_STEPS:-"env install selftest graph sampler decode serving engine speculative attention tp cext ops"}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
[ "$DRY_RUN" = 0 ] && DRY_RUN=""
MODE=plan # plan: record each selected step and its limit; dry: check each step; run: run it
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
: >"$WORK/plan"

# step NAME LIMIT CMD...: run CMD with a time limit of LIMIT seconds (cut to what is left of the budget; LIMIT
# written N+ takes everything that is left: the last step), log it, record rc, then copy the results to $OUT and
# rebuild the archive. A NAME given to several calls runs them all (their logs append to one file)
step() {
    local name=$1 spec=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local limit=${spec%+}
    if [ "$MODE" = plan ]; then
        echo "$name $spec" >>"$WORK/plan"
        return 0
    elif [ "$MODE" = dry ]; then
        dry_step "$name" "$@"
        return 0
    fi
    local left=$((BUDGET_S - ($(date +%s) - T0) - RESERVE_S))
    if ((left < 20)); then
        echo "== $name: skipped, the budget is used up"
        printf '%-10s skipped (budget)\n' "$name" >>"$SUMMARY"
        return 0
    fi
    if [ "$spec" != "$limit" ] || ((limit > left)); then limit=$left; fi
    echo "== $name (limit ${limit}s, t=$(($(date +%s) - T0))s): $*"
    local t=$(date +%s)
    if declare -F "$1" >/dev/null; then # a function of this script: run it in a child bash (exported below)
        timeout -s INT -k 10 "$limit" bash -c "$*" 2>&1 | tee -a "$WORK/$name.log"
    else
        timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$WORK/$name.log"
    fi
    local rc=${PIPESTATUS[0]}
    local note=""
    ((rc == 124 || rc == 137)) && note=" (timed out)"
    echo "== $name: rc=$rc$note after $(($(date +%s) - t))s"
    printf '%-10s rc=%-4s %4ss%s\n' "$name" "$rc" "$(($(date +%s) - t))" "$note" >>"$SUMMARY"
    collect
}

# print_plan: the selected steps in order with their limits and the running total; the summary's "plan" line
# says whether limits + reserve fit the budget (the dry run fails when they do not)
print_plan() {
    local name spec total=0 n=0 mark
    echo "gpu_check plan (limits are estimates; budget ${BUDGET_S}s, ${RESERVE_S}s of it kept for the archive):"
    while read -r name spec; do
        total=$((total + ${spec%+}))
        n=$((n + 1))
        mark=""
        ((total + RESERVE_S > BUDGET_S)) && mark="  <- past the budget: runs only if earlier steps finish early"
        [ "$spec" != "${spec%+}" ] && mark="$mark  (then takes what is left)"
        printf '  %2d. %-10s %4ss  (total %4ss)%s\n' "$n" "$name" "${spec%+}" "$total" "$mark"
    done <"$WORK/plan"
    if ((total + RESERVE_S <= BUDGET_S)); then
        printf '%-10s rc=0    %s steps, limits %ss + reserve %ss <= budget %ss\n' plan "$n" "$total" "$RESERVE_S" \
            "$BUDGET_S" | tee -a "$SUMMARY"
    else # a failure of the dry run only: a real run with a small budget skips the last steps
        local rc=0
        [ -n "$DRY_RUN" ] && rc=1
        printf '%-10s rc=%s    %s steps, limits %ss + reserve %ss > budget %ss\n' plan "$rc" "$n" "$total" \
            "$RESERVE_S" "$BUDGET_S" | tee -a "$SUMMARY"
    fi
}

# dry_step NAME CMD...: check CMD without running it (GPU_CHECK_DRY_RUN=1); scripts and `$PY -m module` commands
# are queued for one argparse-only pass at the end (one Python start for all of them). CMD may start with
# env NAME=VALUE...: the command after them is checked, a queued one parsed with those variables set
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
                case "$a" in
                -p | -n | -k | -m) value_next=1 ;;
                -*) ;;
                *) [ -e "${a%%::*}" ] || problem="$problem missing $a" ;; # (a node id: its file must exist)
                esac
            fi
        done
    elif [ "$1" = "$PY" ] && { [ -f "${2:-}" ] || [ "${2:-}" = "-m" ]; }; then
        (IFS=$'\x1f'; printf '%s\n' "${envs[*]}${envs:+$'\x1f'}${*:2}") >>"$WORK/dry_run_scripts"
    elif [ "$1" = "$PY" ]; then
        problem="missing script ${2:-}"
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

# parse each queued command's options with its own argparse parser and stop there: argparse's parse_args is
# wrapped to raise once it has parsed (type checks and unknown options included), so nothing runs
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
    # after the NAME=VALUEs: a script path, or -m and a module
    argv = fields[next(i for i, f in enumerate(fields) if "=" not in f or os.path.exists(f) or f == "-m"):]
    os.environ.clear()
    os.environ.update(environ, **dict(f.split("=", 1) for f in fields[:len(fields) - len(argv)]))
    module = argv[1] if argv[0] == "-m" else None
    sys.argv = [module] + argv[2:] if module else argv
    here = None if module else os.path.dirname(os.path.abspath(argv[0]))
    if here:
        sys.path.insert(0, here)  # as when the script is run: its folder first (benchmarks import each other)
    err, status = io.StringIO(), None
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
        status = "ran to its end without parsing options"
    except Parsed:
        pass
    except SystemExit as exc:
        status = f"exit {exc.code}: {err.getvalue().strip()[-300:]}"
    except Exception as exc:
        status = f"{type(exc).__name__}: {exc}"
    finally:
        if here:
            sys.path.remove(here)
    print(f"{'parse':<10} rc={0 if status is None else 1:<4} {' '.join(fields)}"
          + ("" if status is None else f": {status}"))
PYEOF
}

# copy the result files produced so far to $OUT (flat names; 5 JSONs + log + summary + archive = the 8 files the
# device tool brings back; serving.json travels in the archive) and rebuild results.tar.gz (everything, the per-step logs and junit XML included)
collect() {
    local f
    for f in selftest.json sampler.json decode.json engine_checks.json speculative.json; do
        [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
    done
    tar czf "$OUT/results.tar.gz.part" -C "$WORK" --exclude=plan --exclude=dry_run_scripts . 2>/dev/null &&
        mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
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
    if "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
        "$PY" -m rast_kernels info
        return 0
    fi
    echo "install: pip failed; building the extension in place instead (later steps run from the source tree)"
    "$PY" setup.py build_ext --inplace || echo "install: the in-place build failed too: the steps run without _C"
    "$PY" -m rast_kernels info
    return 1
}

# after the install step: when the package does not import outside the checkout (no editable install), every
# later step runs from the source tree (`python -m pytest` finds it from the root, the benchmark scripts do not)
use_source_tree_if_needed() {
    [ "$MODE" = run ] || return 0
    if ! (cd /tmp && "$PY" -c "import rast_kernels") >/dev/null 2>&1; then
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "== rast_kernels is not installed: the later steps run from the source tree (PYTHONPATH=$PWD)"
    fi
}

# pytest_args NAME: the options of a pytest step, its junit XML written to $WORK/NAME.xml; one process (no
# xdist: each worker would compile its own kernels) and no --maxfail (a failure must not end the step early)
pytest_args() {
    echo "-q -rfEs -p no:cacheprovider --durations=10 --junitxml=$WORK/$1.xml"
}

# the op test files, the GPU-only tolerance suspects (rope bit-exact in bf16, rms_norm 2 ulps) first
ops_test_files() {
    local first="tests/ops/test_rope_cache.py tests/ops/test_rms_norm.py" f
    echo "$first"
    for f in tests/ops/test_*.py; do
        case " $first " in *" $f "*) ;; *) echo "$f" ;; esac
    done
}

export PY WORK
export -f env_info install_flashinfer install_pkg

main() {
    step env 15 env_info
    step flashinfer 60 install_flashinfer
    [ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    step install 100 install_pkg
    use_source_tree_if_needed
    step selftest 60 "$PY" -m rast_kernels selftest --out "$WORK"
    # shellcheck disable=SC2046
    step graph 60 "$PY" -m pytest tests/engine/test_engine_cuda.py $(pytest_args graph)
    step sampler 40 "$PY" benchmarks/bench_sampler.py --vocab 152064 --batch 1 16 64 256 --dtypes bf16 --pairs 1 2 \
        --budget-s 0.1 --out "$WORK"
    step decode 50 "$PY" benchmarks/bench_decode.py --trio qwen --batch 1 8 --new-tokens 32 --repeats 1 \
        --peer-new-tokens 16 --systems engine engine_hf_forward peer_loop floor --out "$WORK"
    step serving 45 "$PY" benchmarks/bench_serving.py --trio qwen --requests 48 --max-batch 16 --prompt-len 64 \
        --mean-new 48 --max-new 256 --kv-tokens 4096 --step-batch 8 --systems decode_step continuous static \
        --out "$WORK"
    step engine 35 "$PY" benchmarks/gpu_engine_checks.py --out "$WORK"
    step speculative 30 "$PY" benchmarks/bench_speculative.py --parts round_cost e2e model \
        --trio qwen --k 4 --batch 1 --round-batch 1 --repeats 1 --e2e-k 4 --out "$WORK"
    step attention 20 "$PY" benchmarks/bench_decode_attention.py --batch 1 8 32 --lengths 1024 4096 --replays 20 \
        --out "$WORK"
    # shellcheck disable=SC2046
    step tp 20 env RAST_FORCE_PG=1 "$PY" -m pytest tests/engine/test_engine_cuda.py \
        -k "joining_and_leaving or no_host_sync" $(pytest_args tp)
    step tp 20 env RAST_FORCE_PG=1 "$PY" benchmarks/bench_decode.py --trio qwen --tensor-parallel-size 1 \
        --systems engine --batch 1 8 --new-tokens 32 --repeats 1 --out "$WORK/tp1"
    # shellcheck disable=SC2046
    step cext 10 "$PY" -m pytest tests/test_build.py -k cuda $(pytest_args cext)
    step profile 60 "$PY" benchmarks/profile_decode_step.py --out "$WORK/profile"
    # shellcheck disable=SC2046
    step ops 25+ "$PY" -m pytest $(ops_test_files) $(pytest_args ops)
}

main >/dev/null # MODE=plan: records the selected steps and their limits
if [ -n "$DRY_RUN" ]; then
    bash -n "$0" || printf '%-10s rc=1    bash -n failed\n' syntax >>"$SUMMARY"
    MODE=dry
else
    MODE=run
fi
{
    echo "gpu_check: $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET_S}s; steps: $STEPS; work dir $WORK"
    print_plan
    main
    if [ -n "$DRY_RUN" ]; then
        dry_parse
    else
        nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv || true
    fi
    echo "gpu_check: done after $(($(date +%s) - T0))s"
    echo "---- summary"
    cat "$SUMMARY"
} 2>&1 | tee "$OUT/gpu_check.log"
[ -n "$DRY_RUN" ] || collect
ls -la "$OUT"
# exit non-zero when any step failed, so the caller sees it at once
! grep -q 'rc=[1-9]' "$SUMMARY"
