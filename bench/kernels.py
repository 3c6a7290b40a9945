"""Benchmark the quantcompose Triton kernels.

On a CUDA GPU::

    python bench/kernels.py                 # GEMMs + fused activation kernel
    python bench/kernels.py --peak-gbps 4800 --tokens 1,16,512,4096 --weights 4096x4096,11008x4096

prints (1) fp16 ``torch.matmul`` vs ``int8_gemm`` vs ``int4_gemm`` for each weight
(``N×K``, ``nn.Linear`` layout) and token count, with speedups over fp16, and
(2) the fused transform+quantize kernel on a ``tokens × width`` fp16
activation, with achieved bandwidth (bytes read + written / time) and the
percentage of ``--peak-gbps`` (default 3350 GB/s: H100 SXM HBM3).

Without a GPU it says so and exits 0; ``--smoke`` instead runs a tiny
correctness check of every kernel in Triton's CPU interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,16,512,4096", help="comma-separated token counts (GEMM M)")
    p.add_argument("--weights", default="4096x4096,11008x4096,4096x11008",
                   help="comma-separated weight shapes NxK (out x in)")
    p.add_argument("--act-shape", default="4096x4096", help="tokens x width for the fused activation kernel")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="peak memory bandwidth in GB/s (H100 SXM: 3350)")
    p.add_argument("--asym", action="store_true", help="asymmetric activations (zero points) in the GEMMs")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    p.add_argument("--smoke", action="store_true", help="without CUDA: tiny interpreter correctness check")
    return p.parse_args(argv)


def _pairs(text):
    out = []
    for item in text.split(","):
        a, b = item.lower().split("x")
        out.append((int(a), int(b)))
    return out


# --------------------------------------------------------------------------- CPU smoke check


def smoke() -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import quantcompose_kernels as qk
    from quantcompose_kernels.testing import block_sizes, dyadic_blocks, dyadic_input

    g = torch.Generator().manual_seed(0)
    n, M = 192, 21
    kw = {"scale": 2.0 ** torch.randint(-1, 2, (n,), generator=g).float(),
          "rot1": dyadic_blocks(block_sizes(n, 128), generator=g),
          "perm": torch.randperm(n, generator=g),
          "rot2": dyadic_blocks(block_sizes(n, 64), generator=g)}
    x = dyadic_input((M, n), generator=g)
    ok = True
    for bits, sym in [(8, False), (4, True)]:
        got = qk.fused_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        ref = qk.reference_transform_quantize(x, bits=bits, symmetric=sym, **kw)
        same = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        print(f"fused_transform_quantize bits={bits} sym={sym}: {'OK' if same else 'MISMATCH'}")
        ok &= same
    a = torch.randint(0, 256, (M, n), generator=g, dtype=torch.uint8)
    w = torch.randint(-128, 128, (48, n), generator=g, dtype=torch.int8)
    sa, sw = torch.rand(M, generator=g), torch.rand(48, generator=g)
    za = torch.randint(0, 256, (M,), generator=g, dtype=torch.int32)
    y = qk.int8_gemm(a, w, sa, sw, a_zero=za, out_dtype=torch.float32)
    r = qk.reference_int8_gemm(a, w, sa, sw, a_zero=za, out_dtype=torch.float32)
    same = torch.allclose(y, r, rtol=1e-6, atol=1e-6)
    print(f"int8_gemm: {'OK' if same else 'MISMATCH'}")
    ok &= same
    ap, wp = qk.pack_int4(a % 16), qk.pack_int4(w % 8)
    y = qk.int4_gemm(ap, wp, sa, sw, a_zero=za % 16, out_dtype=torch.float32)
    r = qk.reference_int4_gemm(ap, wp, sa, sw, a_zero=za % 16, out_dtype=torch.float32)
    same = torch.allclose(y, r, rtol=1e-6, atol=1e-6)
    print(f"int4_gemm: {'OK' if same else 'MISMATCH'}")
    ok &= same
    return 0 if ok else 1


# --------------------------------------------------------------------------- GPU benchmark


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def bench_gemm(args):
    import torch
    from triton.testing import do_bench

    import quantcompose_kernels as qk

    dev = "cuda"
    rows = []
    for N, K in _pairs(args.weights):
        w16 = torch.randn(N, K, device=dev, dtype=torch.float16)
        w8 = torch.randint(-128, 128, (N, K), device=dev, dtype=torch.int8)
        w4 = torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8)
        sw = torch.rand(N, device=dev)
        cs8 = qk.weight_colsum(w8)
        cs4 = qk.weight_colsum(w4, packed=True, signed=True)
        for M in [int(t) for t in args.tokens.split(",")]:
            x16 = torch.randn(M, K, device=dev, dtype=torch.float16)
            sa = torch.rand(M, device=dev)
            za = torch.randint(0, 16, (M,), device=dev, dtype=torch.int32) if args.asym else None
            if args.asym:
                a8 = torch.randint(0, 256, (M, K), device=dev, dtype=torch.uint8)
            else:
                a8 = torch.randint(-128, 128, (M, K), device=dev, dtype=torch.int8)
            a4 = torch.randint(0, 256, (M, K // 2), device=dev, dtype=torch.uint8)
            t16 = do_bench(lambda: torch.matmul(x16, w16.T), rep=args.rep)
            t8 = do_bench(lambda: qk.int8_gemm(a8, w8, sa, sw, a_zero=za, w_colsum=cs8), rep=args.rep)
            t4 = do_bench(lambda: qk.int4_gemm(a4, w4, sa, sw, a_zero=za, w_colsum=cs4), rep=args.rep)
            tops = lambda t: 2 * M * N * K / (t * 1e-3) / 1e12  # noqa: E731
            rows.append((f"{N}x{K}", M, f"{t16 * 1e3:.1f}", f"{t8 * 1e3:.1f}", f"{t4 * 1e3:.1f}",
                         f"{t16 / t8:.2f}x", f"{t16 / t4:.2f}x", f"{tops(t16):.0f}", f"{tops(t8):.0f}",
                         f"{tops(t4):.0f}"))
    print(f"\nGEMM  y = x·Wᵀ  ({'asymmetric' if args.asym else 'symmetric'} activations; times in µs)")
    _table(rows, ("W (NxK)", "tokens", "fp16", "int8", "int4", "int8 speedup", "int4 speedup",
                  "fp16 TOPS", "int8 TOPS", "int4 TOPS"))


def bench_act(args):
    import torch
    from triton.testing import do_bench

    import quantcompose_kernels as qk
    from quantcompose_kernels.testing import block_sizes, hadamard_blocks, random_orthogonal_blocks

    dev = "cuda"
    M, n = _pairs(args.act_shape)[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, n, device=dev, dtype=torch.float16)
    cases = {
        "per-token quant only": {},
        "SmoothQuant scale": {"scale": torch.rand(n, generator=g) + 0.5},
        "QuaRot Hadamard b=128": {"rot1": hadamard_blocks(block_sizes(n, 128))},
        "rot1·rot2 (no perm)": {"rot1": random_orthogonal_blocks(block_sizes(n, 128), generator=g),
                                "rot2": random_orthogonal_blocks(block_sizes(n, 128), generator=g)},
        "DuQuant s·R1·P·R2": {"scale": torch.rand(n, generator=g) + 0.5,
                              "rot1": random_orthogonal_blocks(block_sizes(n, 128), generator=g),
                              "perm": torch.randperm(n, generator=g),
                              "rot2": random_orthogonal_blocks(block_sizes(n, 128), generator=g)},
    }
    rows = []
    for name, kw in cases.items():
        plan = qk.prepare_transform(n, **kw)
        for bits, sym in [(8, False), (4, False)]:
            fn = lambda: qk.fused_transform_quantize(x, plan=plan, bits=bits, symmetric=sym)  # noqa: E731
            t = do_bench(fn, rep=args.rep)
            code_bytes = M * n if bits != 4 else M * n // 2
            nbytes = x.numel() * x.element_size() + code_bytes + M * 4 * (1 if sym else 2)
            gbps = nbytes / (t * 1e-3) / 1e9
            rows.append((name, plan.mode_name, bits, f"{t * 1e3:.1f}", f"{gbps:.0f}",
                         f"{100 * gbps / args.peak_gbps:.0f}%"))
    print(f"\nfused transform + per-token quantize, fp16 x {M}x{n} (peak {args.peak_gbps:.0f} GB/s)")
    _table(rows, ("transform", "mode", "bits", "µs", "GB/s", "% of peak"))


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed.")
        return 0
    if not torch.cuda.is_available():
        if args.smoke:
            return smoke()
        print("bench/kernels.py needs a CUDA GPU (none found); nothing timed. "
              "Run with --smoke for a tiny CPU-interpreter correctness check.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed (pip install 'quantcompose[triton]').")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  (first calls autotune; timings use triton.testing.do_bench)")
    bench_gemm(args)
    bench_act(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
