"""Compile every op's Triton kernels for sm_90 on a machine without a GPU (shared by the op tests).

The frontend, LLVM and ptxas run on the CPU, so type errors of the compiled path (which the interpreter does not
see) show up without a GPU. The compiles run in ONE fresh process without ``TRITON_INTERPRET`` (a kernel
defined under the interpreter cannot be compiled), started once per test session by :func:`compiled`; each op's
test checks its own line of the result. Run it by hand, e.g. against another Triton::

    PYTHONPATH=/tmp/tr36 python tests/ops/sm90.py        # prints "OK <op> (<n> kernels)" per op

``compile_ptx`` is the one compile helper; ``JOBS`` lists each op's kernel signatures (bf16, fp16, fp32).
"""
from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
DTYPES = ("bf16", "fp16", "fp32")


def compile_ptx(fn, sig, consts, num_warps=4, **options):
    """PTX of ``fn`` (a ``triton.jit`` function) for sm_90: ``sig`` maps runtime args to Triton types, ``consts``
    the constexpr args to their values; ``options``: more compiler options (e.g. ``enable_fp_fusion``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert set(sig) | set(consts) == set(fn.arg_names), sorted(set(fn.arg_names) ^ (set(sig) | set(consts)))
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, **options)).asm["ptx"]
    assert ".target sm_90" in ptx, ptx[:500]
    return ptx


def _rms_norm():
    from rast_kernels.ops.rms_norm import _kernel

    n = 0
    for dt in DTYPES:
        t = "*" + dt
        sig = dict(x_ptr=t, r_ptr=t, w_ptr=t, y_ptr=t, s_ptr=t, n="i32", eps="fp32",
                   sx="i32", sr="i32", sy="i32", ss="i32")
        # Qwen2-7B's hidden size 3584 (BLOCK 4096, 8 warps) with the residual; a one-element row without
        compile_ptx(_kernel(), sig, dict(HAS_RES=True, BLOCK=4096), num_warps=8)
        compile_ptx(_kernel(), sig, dict(HAS_RES=False, BLOCK=1), num_warps=1)
        n += 2
    return n


def _rope_cache():
    """Compiled with the launch's own options: no FMA may appear (it would skip a rounding PyTorch does)."""
    from rast_kernels.ops.rope_cache import LAUNCH_OPTIONS, _kernel

    def compile_checked(sig, consts):
        ptx = compile_ptx(_kernel(), sig, consts, **LAUNCH_OPTIONS)
        assert "fma." not in ptx, "rotary must round each product before the add (no FMA contraction)"

    n = 0
    for dt in DTYPES:
        t = "*" + dt
        sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, cos_ptr=t, sin_ptr=t, kc_ptr=t, vc_ptr=t, col_ptr="*i64", qo_ptr=t,
                   h_q="i32", s_col="i32")
        for name in ("sq_b", "sq_h", "sk_b", "sk_h", "sv_b", "sv_h", "sc_b", "ss_b", "skc_b", "skc_h", "skc_s",
                     "svc_b", "svc_h", "svc_s", "sqo_b", "sqo_h"):
            sig[name] = "i32"
        compile_checked(sig, dict(HALF=64, H_PAD=64))  # head dim 128
        n += 1
    # head dim 80 (padded half) with an int32 column, head dim 2 (a one-element half)
    sig.update(col_ptr="*i32")
    compile_checked(sig, dict(HALF=40, H_PAD=64))
    compile_checked(sig, dict(HALF=1, H_PAD=1))
    return n + 2


def _silu_mul():
    from rast_kernels.ops.silu_mul import _BLOCK, _kernel

    for dt in DTYPES:
        t = "*" + dt
        compile_ptx(_kernel(), dict(g_ptr=t, u_ptr=t, o_ptr=t, n_cols="i32", sg="i32", su="i32", so="i32"),
                    dict(BLOCK=_BLOCK), num_warps=4)
    return len(DTYPES)


def _rast_sample():
    """Both sampler kernels with and without filters / tensor parameters; z / T must be the IEEE division, log
    libdevice's (not the approximate lg2), Philox 32-bit umulhi; the launches use ``enable_fp_fusion=False``."""
    import rast_kernels.ops.rast_sample_triton as m

    p = "*fp32"
    sig1 = dict(base_ptr="*bf16", expert_ptr="*fp32", ebase_ptr="*fp16", stride_b="i32", stride_e="i32",
                stride_eb="i32", alpha_ptr=p, alpha_val="fp32", temp_ptr=p, temp_val="fp32", topk_ptr="*i64",
                topk_val="i32", topp_ptr=p, topp_val="fp32", minp_ptr=p, minp_val="fp32", seed_ptr="*i64",
                seed_lo="i32", seed_hi="i32", off_ptr="*i64", off_lo="i32", off_hi="i32", ws_ptr=p, fstat_ptr=p,
                istat_ptr="*i32", V="i32", NCHUNK="i32", NSTAT="i32")
    sig2 = dict(ws_ptr=p, fstat_ptr=p, istat_ptr="*i32", tok_ptr="*i64", lp_ptr=p, temp_ptr=p, temp_val="fp32",
                topk_ptr="*i64", topk_val="i32", topp_ptr=p, topp_val="fp32", minp_ptr=p, minp_val="fp32",
                seed_ptr="*i64", seed_lo="i32", seed_hi="i32", off_ptr="*i64", off_lo="i32", off_hi="i32",
                V="i32", NCHUNK="i32", NSTAT="i32", NW="i32")
    for t in (False, True):
        flags = dict(TEMP_T=t, TOPK_T=t, TOPP_T=t, MINP_T=t, SEED_T=t, OFF_T=t, FILTER=t, PRECISE=True)
        ptx1 = compile_ptx(m._rast_chunk_kernel, sig1, dict(CHUNK=1024, BLOCK=512, ALPHA_T=t, **flags), 4,
                           enable_fp_fusion=False)
        ptx2 = compile_ptx(m._rast_finish_kernel, sig2, dict(NCP2=512, BLOCK=512, NP=16, WRITE_LP=True, **flags), 8,
                           enable_fp_fusion=False)
        assert "div.rn.f32" in ptx1 and "div.full.f32" not in ptx1, "z / T must be the IEEE division"
        for ptx in (ptx1, ptx2):
            assert "lg2.approx.f32" not in ptx, "log must be libdevice's logf, not the approximate lg2"
        assert "mul.hi.u32" in ptx1, "Philox must use 32-bit umulhi"
    compile_ptx(m._noise_debug_kernel, dict(seed_ptr="*i64", off_ptr="*i64", col_ptr="*i64", words_ptr="*i64",
                                            exp_ptr=p, NCOL="i32"), dict(BLOCK=256, PRECISE=True), 4,
                enable_fp_fusion=False)
    return 5


def _decode_attention():
    """Split kernel (one and eight splits) and combine kernel, head dim 128, bf16/fp16/fp32."""
    from rast_kernels.ops.decode_attention import _kernels

    split, combine = _kernels()
    p, n = "*fp32", 0
    for dt in DTYPES:
        t = "*" + dt
        sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, start_ptr="*i64", end_ptr="*i64", out_ptr=t, m_ptr=p, l_ptr=p,
                   acc_ptr=p, s_max="i32", group="i32", qk_scale="fp32", s_start="i32", s_end="i32")
        for name in ("sq_b", "sq_h", "sq_d", "sk_b", "sk_h", "sk_s", "sk_d", "sv_b", "sv_h", "sv_s", "sv_d",
                     "so_b", "so_h", "so_d"):
            sig[name] = "i32"
        for splits in (1, 8):
            compile_ptx(split, sig, dict(HEAD_DIM=128, D_PAD=128, G_PAD=16, BLOCK_N=64, NUM_SPLITS=splits,
                                         PRECISION="ieee" if dt == "fp32" else "tf32", DOT_FP32=False))
        compile_ptx(combine, dict(out_ptr=t, m_ptr=p, l_ptr=p, acc_ptr=p, so_b="i32", so_h="i32", so_d="i32"),
                    dict(HEAD_DIM=128, D_PAD=128, NUM_SPLITS=8, S_PAD=8))
        n += 3
    return n


JOBS = {"rms_norm": _rms_norm, "rope_cache": _rope_cache, "silu_mul": _silu_mul, "rast_sample": _rast_sample,
        "decode_attention": _decode_attention}


def main(names=None):
    """Compile the ops in ``names`` (all by default); print one ``OK``/``FAIL`` line per op (the next op is
    compiled even when one fails). The process must not interpret Triton."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET to compile"
    import triton

    print(f"triton {triton.__version__}", flush=True)
    for name in names or JOBS:
        try:
            print(f"OK {name} ({JOBS[name]()} kernels)", flush=True)
        except Exception:  # noqa: BLE001 -- reported to the test that owns the op
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


@functools.lru_cache(maxsize=None)
def _run_all(timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve())], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def compiled(name):
    """Assert that op ``name``'s kernels compiled for sm_90 (all ops are compiled once, in one process)."""
    rc, out, err = _run_all()
    assert f"OK {name} (" in out, f"rc={rc}\n{out[-6000:]}\n{err[-4000:]}"


if __name__ == "__main__":
    main(sys.argv[1:])
