"""Compile every op's Triton kernels for sm_90 on a machine without a GPU (shared by the op tests).

The frontend, LLVM and ptxas run on the CPU, so type errors of the compiled path (which the interpreter does not
see) show up without a GPU. The compiles run in ONE fresh process without ``TRITON_INTERPRET`` (a kernel
defined under the interpreter cannot be compiled), started once per test session by :func:`compiled`; each op's
test checks its own line of the result. Run it by hand, e.g. against another Triton::

    PYTHONPATH=/tmp/tr36 python tests/ops/sm90.py        # prints "OK <op> (<n> kernels)" per op

``compile_ptx`` is the one compile helper; ``JOBS`` lists each op's kernel signatures (bf16, fp16, fp32) and the
launch configurations (constexprs, ``num_warps``) the op's launcher uses. Each compile goes on to the sm_90 cubin
(ptxas) and checks that the kernel fits an H100/H200 at that configuration (:func:`check_launch_limits`): the
number of registers per thread and per block, and the shared memory per block. A kernel over a limit compiles
fine but fails at launch ("too many resources requested" / "out of resources"), which the interpreter never
shows. ``SM90_USAGE=1 python tests/ops/sm90.py`` prints each kernel's registers and shared memory.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
DTYPES = ("bf16", "fp16", "fp32")

# Per-block launch limits of an H100 / H200 (compute capability 9.0, CUDA programming guide, "Technical
# Specifications per Compute Capability"): registers are allocated per warp in units of 256, i.e. a thread's
# count is rounded up to a multiple of 8 before it is multiplied by the block's threads; 227 KB is the largest
# shared memory a block may opt in to (Triton opts in to what the kernel needs above 48 KB by itself).
MAX_REGS_PER_THREAD = 255
MAX_REGS_PER_BLOCK = 65536
REG_ALLOC_UNIT = 8
MAX_SHARED_PER_BLOCK = 232448
USAGE = []  # one dict per compile (kernel, config, regs, threads, shared, stack, local), for SM90_USAGE=1


def _cuobjdump():
    """Triton's own cuobjdump (shipped beside its ptxas), else the one on PATH."""
    import triton.backends.nvidia as nv

    bundled = pathlib.Path(nv.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else "cuobjdump"


def resource_usage(cubin: bytes) -> dict:
    """``{"regs", "shared", "stack", "local"}`` of the one kernel in ``cubin``, from ``cuobjdump
    --dump-resource-usage`` (shared: the static shared memory only; Triton's is dynamic, in its metadata)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.findall(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert len(found) == 1, f"expected one kernel in the cubin, cuobjdump says:\n{text}"
    return dict(zip(("regs", "stack", "shared", "local"), map(int, found[0])))


def check_launch_limits(name: str, config: str, kernel, num_warps: int) -> dict:
    """Assert that the compiled ``kernel`` (``triton.compile``'s result) can launch on an H100/H200 with
    ``num_warps`` warps; the message names the kernel and the configuration. Returns its usage (also in USAGE)."""
    use = resource_usage(kernel.asm["cubin"])
    threads = num_warps * 32 * kernel.metadata.num_ctas
    shared = use["shared"] + kernel.metadata.shared  # static + the dynamic shared memory Triton launches with
    regs_block = -(-use["regs"] // REG_ALLOC_UNIT) * REG_ALLOC_UNIT * threads
    row = dict(kernel=name, config=config, regs=use["regs"], threads=threads, regs_per_block=regs_block,
               shared=shared, stack=use["stack"], local=use["local"])
    USAGE.append(row)
    where = f"{name} [{config}] on sm_90"
    assert use["regs"] <= MAX_REGS_PER_THREAD, f"{where}: {use['regs']} registers per thread > {MAX_REGS_PER_THREAD}"
    assert regs_block <= MAX_REGS_PER_BLOCK, \
        f"{where}: {use['regs']} registers x {threads} threads = {regs_block} per block > {MAX_REGS_PER_BLOCK}"
    assert shared <= MAX_SHARED_PER_BLOCK, \
        f"{where}: {shared} bytes of shared memory per block > {MAX_SHARED_PER_BLOCK}"
    return row


def compile_ptx(fn, sig, consts, num_warps=4, aligned=(), **options):
    """PTX of ``fn`` (a ``triton.jit`` function) for sm_90: ``sig`` maps runtime args to Triton types, ``consts``
    the constexpr args to their values; ``options``: more compiler options (e.g. ``enable_fp_fusion``). The
    kernel is also taken to its cubin and checked against the launch limits (:func:`check_launch_limits`).

    ``aligned`` names args declared 16-divisible, and an int arg may be given in ``consts`` as 1: that is how a
    launch specializes 16-byte aligned pointers, multiples of 16 and unit strides, so a job can compile the
    kernel as a launch on contiguous tensors builds it (vectorized loads: other registers than the generic
    build)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert set(sig) | set(consts) == set(fn.arg_names), sorted(set(fn.arg_names) ^ (set(sig) | set(consts)))
    ptr_types = sorted({t for t in sig.values() if t.startswith("*")})
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, **options))
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx, ptx[:500]
    config = ", ".join([f"{k}={v}" for k, v in consts.items()] + [f"num_warps={num_warps}"]
                       + [f"{k}={v}" for k, v in options.items()] + ["/".join(ptr_types)]
                       + ([f"16-divisible: {'/'.join(aligned)}"] if aligned else []))
    check_launch_limits(kernel.metadata.name, config, kernel, num_warps)
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


# the chunk kernel's arguments of expert pairs 2..4 and of base plausibility (K = 1, plausibility off: unused)
_RAST_PAIR_SIG = dict(e2_ptr="*bf16", eb2_ptr="*fp16", stride_e2="i32", stride_eb2="i32", e3_ptr="*fp32",
                      eb3_ptr="*bf16", stride_e3="i32", stride_eb3="i32", e4_ptr="*bf16", eb4_ptr="*bf16",
                      stride_e4="i32", stride_eb4="i32", pmax_ptr="*fp32", plog_ptr="*fp32")


def _rast_sample_sigs(base: str, expert: str, expert_base: str):
    """Runtime-argument signatures of the two sampler kernels (chunk pass, finish pass) for these logits dtypes."""
    p = "*fp32"
    sig1 = dict(base_ptr=base, expert_ptr=expert, ebase_ptr=expert_base, stride_b="i32", stride_e="i32",
                stride_eb="i32", alpha_ptr=p, alpha_val="fp32", temp_ptr=p, temp_val="fp32", topk_ptr="*i64",
                topk_val="i32", topp_ptr=p, topp_val="fp32", minp_ptr=p, minp_val="fp32", seed_ptr="*i64",
                seed_lo="i32", seed_hi="i32", off_ptr="*i64", off_lo="i32", off_hi="i32", ws_ptr=p, fstat_ptr=p,
                istat_ptr="*i32", V="i32", NCHUNK="i32", NSTAT="i32", **_RAST_PAIR_SIG)
    sig2 = dict(ws_ptr=p, fstat_ptr=p, istat_ptr="*i32", tok_ptr="*i64", lp_ptr=p, temp_ptr=p, temp_val="fp32",
                topk_ptr="*i64", topk_val="i32", topp_ptr=p, topp_val="fp32", minp_ptr=p, minp_val="fp32",
                seed_ptr="*i64", seed_lo="i32", seed_hi="i32", off_ptr="*i64", off_lo="i32", off_hi="i32",
                V="i32", NCHUNK="i32", NSTAT="i32", NW="i32")
    return sig1, sig2


def _rast_sample():
    """Both sampler kernels with and without filters / tensor parameters (and filters with a number seed, mixed
    per row in uint64); z / T must be the IEEE division, log libdevice's (not the approximate lg2), Philox 32-bit
    umulhi, every exp of kernel 2 (the top-p masses) libdevice's; the launches use ``enable_fp_fusion=False``."""
    import rast_kernels.ops.rast_sample_triton as m

    p = "*fp32"
    sig1, sig2 = _rast_sample_sigs("*bf16", "*fp32", "*fp16")  # mixed input dtypes
    for t, seed_t in ((False, False), (True, True), (True, False)):
        flags = dict(TEMP_T=t, TOPK_T=t, TOPP_T=t, MINP_T=t, SEED_T=seed_t, OFF_T=t, FILTER=t, PRECISE=True)
        ptx1 = compile_ptx(m._rast_chunk_kernel, sig1, dict(CHUNK=1024, BLOCK=512, ALPHA_T=t, NPAIRS=1, PLAUS=False,
                                                            **flags), 4, enable_fp_fusion=False)
        ptx2 = compile_ptx(m._rast_finish_kernel, sig2, dict(NCP2=512, BLOCK=512, NP=16, WRITE_LP=True, **flags), 8,
                           enable_fp_fusion=False)
        assert "div.rn.f32" in ptx1 and "div.full.f32" not in ptx1, "z / T must be the IEEE division"
        for ptx in (ptx1, ptx2):
            assert "lg2.approx.f32" not in ptx, "log must be libdevice's logf, not the approximate lg2"
        assert "mul.hi.u32" in ptx1, "Philox must use 32-bit umulhi"
        # tl.exp lowers to mul by log2(e) + ex2.approx.f32, libdevice's expf to ex2.approx.ftz.f32 after an exact
        # range reduction: the top-p masses S_k and H(t) must come from one exp, libdevice's
        assert "ex2.approx.f32" not in ptx2, "kernel 2's exp must be libdevice's expf, not the approximate tl.exp"
    # K = 2 and K = MAX_PAIRS expert pairs read in the one pass, with base plausibility (alpha a [B, K] tensor)
    for npairs in (2, m.MAX_PAIRS):
        flags = dict(TEMP_T=True, TOPK_T=True, TOPP_T=True, MINP_T=True, SEED_T=True, OFF_T=True, FILTER=True,
                     PRECISE=True)
        ptx1 = compile_ptx(m._rast_chunk_kernel, sig1, dict(CHUNK=1024, BLOCK=512, ALPHA_T=True, NPAIRS=npairs,
                                                            PLAUS=True, **flags), 4, enable_fp_fusion=False)
        assert "div.rn.f32" in ptx1 and "lg2.approx.f32" not in ptx1
    compile_ptx(m._noise_debug_kernel, dict(seed_ptr="*i64", off_ptr="*i64", col_ptr="*i64", words_ptr="*i64",
                                            exp_ptr=p, NCOL="i32"), dict(BLOCK=256, PRECISE=True), 4,
                enable_fp_fusion=False)
    return 9


def _attention_configs():
    """``(dtype, head_dim, splits)`` of the attention split kernels: head dim 128 in every dtype with one and
    eight splits; the other tile shapes of ``block_n`` (64: BLOCK_N 64 with a narrower tile, 256: BLOCK_N 32)
    in bf16 (fp16 has the same sizes) and fp32 (the biggest tiles), with splits. G_PAD 16 covers every group
    up to 16 query heads per kv head (the configs under benchmarks/configs have 4 to 7)."""
    return [(dt, 128, s) for dt in DTYPES for s in (1, 8)] + [(dt, d, 8) for dt in ("bf16", "fp32") for d in (64, 256)]


def _decode_attention():
    """Split kernel (one and eight splits) and combine kernel (up to 64 splits, head dims up to 256) at the
    launcher's tile sizes, bf16/fp16/fp32."""
    from rast_kernels.ops.attention_common import block_n
    from rast_kernels.ops.decode_attention import _kernels

    split, combine = _kernels()
    p, n = "*fp32", 0
    for dt, dim, splits in _attention_configs():
        t = "*" + dt
        sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, start_ptr="*i64", end_ptr="*i64", out_ptr=t, m_ptr=p, l_ptr=p,
                   acc_ptr=p, s_max="i32", group="i32", qk_scale="fp32", s_start="i32", s_end="i32")
        for name in ("sq_b", "sq_h", "sq_d", "sk_b", "sk_h", "sk_s", "sk_d", "sv_b", "sv_h", "sv_s", "sv_d",
                     "so_b", "so_h", "so_d"):
            sig[name] = "i32"
        consts = dict(HEAD_DIM=dim, D_PAD=dim, G_PAD=16, BLOCK_N=block_n(dim), NUM_SPLITS=splits,
                      PRECISION="ieee" if dt == "fp32" else "tf32", DOT_FP32=False)
        compile_ptx(split, sig, consts)
        # as launched on contiguous q / caches / out (unit last strides, 16-aligned rows; see _paged_attention)
        unit = ("sq_d", "sk_d", "sv_d", "so_d")
        compile_ptx(split, {k: v for k, v in sig.items() if k not in unit}, dict(consts, **{k: 1 for k in unit}),
                    aligned=[k for k in sig if k.endswith("_ptr")] + ["sq_b", "sq_h", "sk_b", "sk_h", "sk_s", "sv_b",
                                                                      "sv_h", "sv_s", "so_b", "so_h"])
        n += 2
    for dt in DTYPES:
        t = "*" + dt
        for dim, splits in ((128, 8), (256, 64)):
            compile_ptx(combine, dict(out_ptr=t, m_ptr=p, l_ptr=p, acc_ptr=p, so_b="i32", so_h="i32", so_d="i32"),
                        dict(HEAD_DIM=dim, D_PAD=dim, NUM_SPLITS=splits, S_PAD=splits))
            n += 1
    return n


def _paged_attention():
    """The paged split kernel at the same configurations as decode_attention's (its combine kernel is
    decode_attention's, compiled there); block table int32, lengths int32 and int64. Any strides with 64-bit
    slot offsets (the most registers), contiguous with 32-bit ones (the engine's pools, under 2**31 elements)
    and, at head dim 128, with 64-bit ones."""
    from rast_kernels.ops.attention_common import block_n
    from rast_kernels.ops.paged_attention import _kernels

    split, _ = _kernels()
    p, n = "*fp32", 0
    strides = ("s_len", "sbt_b", "sbt_j", "sq_b", "sq_h", "sq_d", "sk_n", "sk_s", "sk_h", "sk_d",
               "sv_n", "sv_s", "sv_h", "sv_d", "so_b", "so_h", "so_d")
    unit = ("s_len", "sbt_j", "sq_d", "sk_d", "sv_d", "so_d")  # contiguous tensors: these strides are 1
    for dt, dim, splits in _attention_configs():
        t = "*" + dt
        sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, bt_ptr="*i32", len_ptr="*i32" if splits == 1 else "*i64", out_ptr=t,
                   m_ptr=p, l_ptr=p, acc_ptr=p, block_size="i32", max_len="i32", group="i32", qk_scale="fp32")
        consts = dict(HEAD_DIM=dim, D_PAD=dim, G_PAD=16, BLOCK_N=block_n(dim), NUM_SPLITS=splits,
                      PRECISION="ieee" if dt == "fp32" else "tf32", DOT_FP32=False)
        # any strides (the generic build), then contiguous q / pools / table / out with 16-aligned rows (the
        # engine's case: unit strides and vectorized loads)
        compile_ptx(split, dict(sig, **{k: "i32" for k in strides}), dict(consts, OFFS64=True))
        for offs64 in (False, True) if dim == 128 else (False,):
            compile_ptx(split, dict(sig, **{k: "i32" for k in strides if k not in unit}),
                        dict(consts, OFFS64=offs64, **{k: 1 for k in unit}),
                        aligned=[k for k in sig if k.endswith("_ptr")] + ["sq_b", "sq_h", "sk_n", "sk_s", "sk_h",
                                                                          "sv_n", "sv_s", "sv_h", "so_b", "so_h"])
            n += 1
        n += 1
    return n


def _paged_multi_token_attention():
    """The multi-token split kernel (its combine kernel is compiled with decode_attention's) at the packed-row
    tiles its launcher picks (``multi_token_rows``: 64 rows for 16-bit at head dim 128, 32 at 256, 16 for fp32),
    one and eight splits, contiguous tensors with 32-bit slot offsets (the engine's case), and once with any
    strides and 64-bit offsets."""
    import torch

    from rast_kernels.ops.attention_common import block_n
    from rast_kernels.ops.paged_attention import _multi_token_kernel, multi_token_rows

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    p = "*fp32"
    strides = ("s_len", "sbt_b", "sbt_j", "sq_b", "sq_t", "sq_h", "sq_d", "sk_n", "sk_s", "sk_h", "sk_d",
               "sv_n", "sv_s", "sv_h", "sv_d", "so_b", "so_t", "so_h", "so_d")
    unit = ("s_len", "sbt_j", "sq_d", "sk_d", "sv_d", "so_d")
    configs = [("bf16", 128, 1, False), ("bf16", 128, 8, False), ("fp16", 128, 8, False), ("fp32", 128, 8, False),
               ("bf16", 256, 8, False), ("bf16", 128, 8, True)]
    for dt, dim, splits, generic in configs:
        t = "*" + dt
        sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, bt_ptr="*i32", len_ptr="*i64", out_ptr=t, m_ptr=p, l_ptr=p,
                   acc_ptr=p, n_q="i32", n_qt="i32", q_tile="i32", block_size="i32", max_len="i32", group="i32",
                   qk_scale="fp32")
        consts = dict(HEAD_DIM=dim, D_PAD=dim, M_PAD=multi_token_rows(dtypes[dt], dim), BLOCK_N=block_n(dim),
                      NUM_SPLITS=splits, PRECISION="ieee" if dt == "fp32" else "tf32", DOT_FP32=False)
        if generic:
            compile_ptx(_multi_token_kernel(), dict(sig, **{k: "i32" for k in strides}), dict(consts, OFFS64=True))
        else:
            compile_ptx(_multi_token_kernel(), dict(sig, **{k: "i32" for k in strides if k not in unit}),
                        dict(consts, OFFS64=False, **{k: 1 for k in unit}),
                        aligned=[k for k in sig if k.endswith("_ptr")] + ["sq_b", "sq_t", "sq_h", "sk_n", "sk_s",
                                                                          "sk_h", "sv_n", "sv_s", "sv_h", "so_b",
                                                                          "so_t", "so_h"])
    return len(configs)


def _rast_sample_launch_configs():
    """Both sampler kernels at every (CHUNK, BLOCK1, BLOCK2, NCP2, num_warps) that ``launch_config`` picks for
    Qwen2's vocabularies (151936, 152064) at B = 1..256 on a 132-SM H100/H200, with the parameter flags all
    off (scalars, no filter) and all on (tensors, filters, log-probs: the most code)."""
    import torch
    import triton

    import rast_kernels.ops.rast_sample_triton as m

    configs = sorted({m.launch_config(b, v, torch.device("cpu")) for v in (151936, 152064) for b in range(1, 257)})
    sig1, sig2 = _rast_sample_sigs("*bf16", "*bf16", "*bf16")
    n = 0
    for chunk, nchunk, b1, b2 in configs:
        for t in (False, True):
            flags = dict(TEMP_T=t, TOPK_T=t, TOPP_T=t, MINP_T=t, SEED_T=t, OFF_T=t, FILTER=t, PRECISE=True)
            # num_warps as rast_sample_triton launches them
            compile_ptx(m._rast_chunk_kernel, sig1, dict(CHUNK=chunk, BLOCK=b1, ALPHA_T=t, NPAIRS=1, PLAUS=False,
                                                         **flags), 4 if b1 <= 512 else 8, enable_fp_fusion=False)
            compile_ptx(m._rast_finish_kernel, sig2, dict(NCP2=triton.next_power_of_2(nchunk), BLOCK=b2,
                                                          NP=m.NUM_PIVOTS, WRITE_LP=t, **flags),
                        8, enable_fp_fusion=False)
            n += 2
    return n


def _rast_sample_all():
    return _rast_sample() + _rast_sample_launch_configs()


JOBS = {"rms_norm": _rms_norm, "rope_cache": _rope_cache, "silu_mul": _silu_mul, "rast_sample": _rast_sample_all,
        "decode_attention": _decode_attention, "paged_attention": _paged_attention,
        "paged_multi_token_attention": _paged_multi_token_attention}


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
    if os.environ.get("SM90_USAGE"):
        for row in USAGE:
            print(f"  {row['kernel']:<22} regs {row['regs']:>3} x {row['threads']:>3} threads ({row['regs_per_block']:>5}"
                  f"/block)  smem {row['shared']:>6} B  stack {row['stack']}  local {row['local']}  [{row['config']}]")


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
