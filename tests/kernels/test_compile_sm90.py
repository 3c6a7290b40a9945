"""The kernels compile for Hopper (sm_90) — checked without a GPU.

Triton can compile ahead of time for a target it does not run on (its wheel ships
ptxas).  This catches GPU-only compile errors (layouts of reshape/split, int8
``tl.dot`` constraints, shared-memory limits) that the interpreter never sees.  It
runs in a subprocess because kernels defined under ``TRITON_INTERPRET=1`` cannot
be compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.needs_triton, pytest.mark.slow]

_CHILD = textwrap.dedent(r'''
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from quantcompose_kernels import act_quant, gemm

    TY = {torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8", torch.uint8: "*u8",
          torch.int32: "*i32"}

    def build(fn, args, consts, num_warps, num_stages):
        sig, cx, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name], cx[name] = "constexpr", consts[name]
            elif args[name] is None:
                sig[name], cx[name] = "constexpr", None
            else:
                v = args[name]
                sig[name] = TY[v] if isinstance(v, torch.dtype) else ("fp32" if isinstance(v, float) else "i32")
                if sig[name].startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        assert k.metadata.shared <= 232448, k.metadata.shared
        return k

    fa = act_quant._fused_act_quant_kernel
    for mode, pack, sym, bm in [(0, False, False, 128), (1, True, False, 64), (2, True, True, 32)]:
        f16 = torch.float16
        args = dict(x_ptr=f16, codes_ptr=torch.uint8 if (pack or not sym) else torch.int8,
                    scales_ptr=torch.float32, zeros_ptr=None if sym else torch.int32,
                    scratch_ptr=f16 if mode == 2 else None, c1_ptr=f16 if mode == 2 else None,
                    b1_start_ptr=torch.int32 if mode == 2 else None, b1_width_ptr=torch.int32 if mode == 2 else None,
                    c2_ptr=f16, o_start_ptr=torch.int32, o_width_ptr=torch.int32,
                    src_start_ptr=torch.int32 if mode == 0 else None, gidx_ptr=torch.int32 if mode else None,
                    mul_ptr=None, M=7, N=4096, stride_xm=4096, stride_cm=4096, NB1=32, NB2=32, M_BUCKET=7,
                    clip=1.0)
        qmax = (7 if pack else 127) if sym else (15 if pack else 255)
        consts = dict(SB1=128, OW=128, MODE=mode, HAS_C2=True, HAS_MUL=False, DOT_PREC="tf32",
                      BITS=4 if pack else 8, QMIN=-(qmax + 1) if sym else 0, QMAX=qmax, SYMMETRIC=sym, PACK=pack,
                      EPS=1e-8, ALIGNED=True, BLOCK_M=bm)
        k = build(fa, args, consts, 8, 2)
        print("act", mode, "wgmma" in k.asm["ptx"])

    fg = gemm._lowbit_gemm_kernel
    for packed, a_asym, w_asym in [(False, True, True), (True, True, False), (True, False, True)]:
        kw = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64 if packed else 128, "GROUP_M": 8}
        args = dict(a_ptr=torch.uint8 if packed else torch.int8, w_ptr=torch.uint8 if packed else torch.int8,
                    out_ptr=torch.float16, a_scale_ptr=torch.float32, w_scale_ptr=torch.float32,
                    a_zero_ptr=torch.int32 if a_asym else None, w_zero_ptr=torch.int32 if w_asym else None,
                    w_colsum_ptr=torch.int32 if a_asym else None, bias_ptr=torch.float16,
                    M=4096, N=4096, K=4096, KS=2048 if packed else 4096, M_BUCKET=4096,
                    stride_am=4096, stride_wn=4096, stride_om=4096)
        consts = dict(PACKED=packed, A_XOR=a_asym and not packed, W_XOR=w_asym and not packed,
                      A_SIGNED=not a_asym, W_SIGNED=not w_asym, A_ZP=a_asym, W_ZP=w_asym, HAS_BIAS=True,
                      stride_ak=1, stride_wk=1, stride_on=1, **kw)
        k = build(fg, args, consts, 8, 3)
        assert "wgmma" in k.asm["ptx"], "expected Hopper wgmma for a 128x256 int8 tile"
        print("gemm", packed, "ok")
    print("ALL-COMPILED")
''')


def test_kernels_compile_for_sm90(tmp_path):
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except Exception as exc:  # pragma: no cover - depends on the triton wheel
        pytest.skip(f"no NVIDIA backend / ptxas in this triton install: {exc}")
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("ptxas not found")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ALL-COMPILED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
