"""Registers, spills and shared memory of every Triton kernel, compiled for a GPU that need not
be there.

Triton compiles for any NVIDIA target without a device (its wheel carries ``ptxas`` and
``cuobjdump``), so this runs on a laptop or in CI and answers the first question about a slow
kernel: does it spill? A program that takes all 255 registers of a thread leaves its
multiprocessor no second program to hide latency with, and a stack frame means spilled values
go through local memory. Compile errors show here too, before any GPU time is spent.

    python benchmarks/kernel_resources.py                         # bf16, d = e = 64, H100/H200
    python benchmarks/kernel_resources.py --chunks 64 --warps 8 --dtype float16
    python benchmarks/kernel_resources.py --warps 4 --maxnreg 168      # three programs per SM
    python benchmarks/kernel_resources.py --deg 4 --d 32 --e 32 --dtype float16

Prints one row per kernel and configuration: registers per thread, stack frame (bytes of
spilled registers per thread), shared memory, the tensor loads inside loops that Triton's
pipeliner prefetches (asynchronous copies issued stages ahead) against those it leaves
synchronous (each one a full memory latency per iteration unless other warps hide it), and the
Hopper matrix products inside loops against the waits that leave none of them in flight (where
the two are equal, a loop step's products run one after another: the scans' four per chunk
step, for instance).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from power_retention.model import fused  # noqa: E402
from power_retention.ops.triton import host, kernels  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INTS = {"Hk", "Hq", "Hx", "h0", "HS", "hq0", "d", "e", "D", "SEQS", "L", "T", "held", "cap",
        "H", "N", "M"}
INDEX = {"cu_seqlens": "*i64", "chunk_offsets": "*i64", "chunk_indices": "*i32",
         "block_indices": "*i32", "counters": "*i32", "index": "*i32"}
INPUTS = {"q", "k", "v", "x", "o", "o_low", "do", "dq", "dk", "dv", "bk", "bv", "q_out", "k_out",
          "cos", "sin", "res", "w", "out", "total", "gate", "up", "wq", "wk", "wv", "wg", "wu",
          "bq", "bu", "bias"}


def signature(fn, dtype: torch.dtype, constexprs: dict, states: torch.dtype) -> dict:
    """Triton types of ``fn``'s arguments for inputs of ``dtype`` and chunk states (and ``dy``)
    of ``states``, as host.py allocates them."""
    states = TRITON_TYPES[states]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in ("scale", "coef_scale", "eps"):
            sig[name] = "fp32"
        elif name in INDEX:
            sig[name] = INDEX[name]
        elif name == "G":                           # the attention form's cumulative gates
            sig[name] = "*fp64"
        elif name in INPUTS or (name == "y" and not constexprs.get("REVERSE")):
            sig[name] = "*" + TRITON_TYPES[dtype]    # the forward scan's y is v
        elif name == "dy":                          # bf16 for the bf16 products, else fp32
            sig[name] = "*bf16" if constexprs.get("BF16") else "*fp32"
        elif name in ("states", "dstates") or (name == "y" and constexprs.get("REVERSE")):
            sig[name] = "*" + states
        else:
            sig[name] = "*fp32"
    return sig


def alignment(fn, sig: dict) -> dict:
    """The specialisation a launch gives: pointers of 16-byte aligned tensors and integers that
    are multiples of 16 (head sizes, the state's rows and heads of the standard case) are known
    to divide by 16. Without it no load is vectorised or pipelined, so every figure would
    describe another kernel than the one that runs."""
    known = {name for name, ty in sig.items() if ty.startswith("*")} | {"d", "e", "D", "Hk",
                                                                         "Hq", "Hx", "H"}
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name in known and sig[name] != "constexpr"}


def resources(cubin: bytes) -> tuple[int, int]:
    """Registers per thread and stack frame bytes, read from the cubin by ``cuobjdump``."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-400:]}")
    return int(found.group(1)), int(found.group(2))


def loop_ops(ttgir: str) -> dict[str, int]:
    """Operations inside ``scf.for`` loops of a TTGIR listing: tensor loads prefetched
    (asynchronous copies) and plain, Hopper matrix products (``warp_group_dot``) and the waits
    for them that let none stay in flight (``pendings = 0``: the next instruction needs the
    product, so products in a loop step run one after another)."""
    stack, found = [], dict.fromkeys(("prefetched", "plain", "dots", "full_waits"), 0)
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            stack and stack.pop()
        if any(stack):
            found["prefetched"] += "ttg.async_copy_global_to_local" in text
            found["plain"] += " tt.load " in text and ": tensor<" in text
            found["dots"] += "ttng.warp_group_dot " in text
            found["full_waits"] += "ttng.warp_group_dot_wait" in text and "pendings = 0" in text
        if text.endswith("{"):
            stack.append("scf.for" in text)
    return found


def cases(dtype: torch.dtype, d: int, e: int, chunks, blocks, deg: int, gated: bool = True):
    """``(kernel, constexprs)`` for every kernel as host.py launches it."""
    feat = host._features(d, deg, torch.device("cpu"))
    flags = {**host._flags(dtype, d, e, deg), "USE_GATE": gated}
    tiling = {"BD": host.BD, "KP": host.KP, "NB": d // host.BD, "NT": feat.NT}
    if deg == 2:                                   # no tables: None arguments are constexprs
        tiling.update(index=None, coefs=None)
    EP = max(16, triton.next_power_of_2(e))
    low = host.low_width(dtype, e) > 0
    for C in chunks:
        # the scans forward (keys, values, an initial state) and reverse (queries, dy, dy_z;
        # also as training runs it: no final-state gradient in, no initial one out), and the
        # forward one that keeps only the final state (folding a decoding buffer)
        directions = [dict(REVERSE=False, HAS_INIT=True, HAS_Y1=False, y1=None,
                           STORE_STATES=True, STORE_FINAL=True),
                      dict(REVERSE=True, HAS_INIT=True, HAS_Y1=True, STORE_STATES=True,
                           STORE_FINAL=True),
                      dict(REVERSE=True, HAS_INIT=False, HAS_Y1=True, STORE_STATES=True,
                           STORE_FINAL=False),
                      dict(REVERSE=False, HAS_INIT=True, HAS_Y1=False, y1=None,
                           STORE_STATES=False, STORE_FINAL=True)]
        for way in directions:
            for BE in blocks:
                yield kernels.scan_kernel, dict(C=C, BE=BE, GROUPS=1, LOOP_FOR=True, **way,
                                                **tiling, **flags)
        yield kernels.output_fwd_kernel, dict(C=C, EP=EP, LOW=low, **tiling, **flags)
        yield kernels.dq_kernel, dict(C=C, EP=EP, **tiling, **flags)
        yield kernels.dkv_kernel, dict(C=C, EP=EP, GROUPS=1, **tiling, **flags)
    yield kernels.prepare_bwd_kernel, dict(BT=64, EP=EP, LOW=low, BF16=flags["BF16"],
                                           PREC=flags["PREC"])
    # the attention form: blocks of queries (keys for dkv), the other side a step at a time
    block, step = host._attention_blocks(dtype, d, e)
    attention = dict(DK=d, EP=EP, USE_GATE=gated, **host._attention_flags(dtype, d, e, deg))
    yield kernels.attention_fwd_kernel, dict(BM=block, BN=step, LOW=low, **attention)
    yield kernels.attention_dq_kernel, dict(BM=block, BN=step, **attention)
    yield kernels.attention_dkv_kernel, dict(BM=step, BN=block, GROUPS=1, **attention)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    tables = {} if deg != 2 else dict(index=None, coefs=None)
    for R in (64, 32) if e <= 64 else (32,):                # as host.decode_into picks
        blocks = triton.cdiv(feat.D, R)
        for split in (1, blocks):
            yield kernels.decode_kernel, dict(G=4, GP=4, LP=64, DK=d, R=R,
                                              NBLK=triton.cdiv(blocks, split), EP=EP,
                                              SPLIT=split, DEG=deg, STAGES=3,
                                              PRECISION=host._precision(dtype, deg),
                                              **tables)
    yield kernels.decode_finish_kernel, dict(NT=blocks, NTP=triton.next_power_of_2(blocks),
                                             EP=EP)
    yield fused._rms_norm_kernel, dict(HAS_RES=True, BH=2048)
    yield fused._silu_mul_kernel, dict(BLOCK=1024)
    yield fused._log_sigmoid_kernel, dict(BLOCK=1024)
    yield fused._rope_kernel, dict(HALF=d // 2, HQP=32, HKP=8)
    for splits in (1, 4):                       # K = 2048: at most 4 splits (fused._launch)
        skinny = dict(K=2048, HAS_BIAS=True, PB=fused.PAIR_BLOCK, BM=16, BK=fused.K_BLOCK,
                      KS=2048 // splits, SPLITK=splits, WS=splits * 2 * 16 * 32,
                      STAGES=fused.STAGES, PREC=precision)
        yield fused._qkv_kernel, dict(HAS_GATE=True, HALF=d // 2, GP=16, **skinny)
        yield fused._gate_up_kernel, skinny
        yield fused._linear_kernel, dict(HAS_RES=True, **skinny)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--d", type=int, default=64, help="head size of queries and keys")
    parser.add_argument("--e", type=int, default=64, help="head size of values")
    parser.add_argument("--deg", type=int, choices=(2, 4), default=2, help="degree p")
    parser.add_argument("--chunks", type=int, nargs="+", default=list(host.CHUNK_CANDIDATES))
    parser.add_argument("--blocks", type=int, nargs="+", default=[64],
                        help="value columns per program of the scans (BE)")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--maxnreg", type=int, default=None,
                        help="cap on registers per thread (as triton.Config's maxnreg)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--ungated", action="store_true",
                        help="the kernels as calls without gates launch them")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    target = GPUTarget("cuda", args.arch, 32)
    print(f"{args.dtype}, p = {args.deg}, d = {args.d}, e = {args.e}, sm_{args.arch}, "
          f"{args.stages} stages{', ungated' if args.ungated else ''}")
    print(f"{'kernel':<20} {'C':>4} {'BE':>3} {'warps':>5} {'regs':>5} {'stack B':>8} "
          f"{'smem KiB':>9} {'loop loads async/plain':>23} {'loop products/full waits':>25}")
    for fn, constexprs in cases(dtype, args.d, args.e, args.chunks, args.blocks, args.deg,
                                not args.ungated):
        for warps in args.warps:
            sig = signature(fn, dtype, constexprs,
                            host._state_dtype(dtype, args.d, args.e, args.deg))
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs,
                            attrs=alignment(fn, sig))
            compiled = triton.compile(src, target=target,
                                      options={"num_warps": warps, "num_stages": args.stages,
                                               "maxnreg": args.maxnreg})
            regs, stack = resources(compiled.asm["cubin"])
            ops = loop_ops(compiled.asm["ttgir"])
            print(f"{fn.__name__:<20} {constexprs.get('C', '-'):>4} "
                  f"{constexprs.get('BE', '-'):>3} {warps:>5} {regs:>5} {stack:>8} "
                  f"{compiled.metadata.shared / 1024:>9.1f} "
                  f"{'{prefetched}/{plain}'.format(**ops):>23} "
                  f"{'{dots}/{full_waits}'.format(**ops):>25}", flush=True)


if __name__ == "__main__":
    main()
