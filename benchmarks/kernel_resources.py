"""Registers, spills, shared memory and tensor-core instructions of the Triton kernels, compiled
ahead of time for a GPU architecture. Needs no GPU: the kernels are compiled, never launched.

    python benchmarks/kernel_resources.py --head-dim 64 128 --out kernels_sm90.json
    python benchmarks/kernel_resources.py --head-dim 128 --candidate table --candidate sub_chunk=64,warps=4

It runs the forward and backward custom ops on CPU tensors of the benchmarks' shape (16 heads,
one sequence of --seq-len, bf16) with every kernel launch turned into Triton's "warmup" (compile
only) against a fake driver that reports the target architecture (--arch, 90 = H100 / H200).
For each compiled kernel it reads the cubin with the CUDA tools Triton ships
(`cuobjdump --dump-resource-usage`, `nvdisasm`):

- registers per thread and the bytes spilled to local memory per thread;
- static shared memory per program (Triton's metadata);
- the programs one SM can hold by its 64K registers and by its shared memory;
- the tensor-core instructions in the SASS: `HGMMA` (Hopper's warpgroup products, 64-row
  tiles, operands from shared memory) against `HMMA` (the older per-warp 16 x 8 products).

These are facts of the compiled code, not timings; what they mean for speed is argued in
benchmarks/results/README.md ("What bounds the kernels at head dim 128"). The Triton version that
compiles is the one imported (the result records it); the H200 machine has Triton 3.6.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.tune_attention import parse_candidate  # noqa: E402
from titan_linear.ops.efficient_attn import triton_op  # noqa: E402
from titan_linear.ops.efficient_attn.triton_tuning import HEAD_DIMS, launch_config, override  # noqa: E402

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024  # H100 / H200: 228 KiB per SM, 227 KiB usable by one program


class _CompileOnlyDriver:
    """Just enough of a Triton driver for JITFunction to compile for `arch` on a machine
    without that GPU (device 0, stream 0); nothing is ever loaded or launched."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(arch: int):
    """Every `kernel[grid](...)` inside the `with` compiles for `arch` and records (kernel name,
    launch keywords but num_warps, CompiledKernel) in the yielded list instead of launching."""
    compiled = []
    old_getitem = JITFunction.__getitem__

    def getitem(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((self.fn.__name__, {k: v for k, v in kwargs.items() if k != "num_warps"}, kernel))
        return launch

    from triton.runtime import driver
    previous = driver._active  # reset_active would build the default driver, which needs a GPU
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.__getitem__ = getitem
    try:
        yield compiled
    finally:
        JITFunction.__getitem__ = old_getitem
        driver._active = previous


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"kernel_resources: {path} not found: this Triton has no CUDA tools")
    return path


def cubin_facts(cubin: bytes) -> dict:
    """Registers, local (spill) bytes and tensor-core instruction counts of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    # SASS lines read "/*0a30*/  @!P0 HMMA.16816.F32.BF16 R4, ... ;": drop the address and any
    # predicate, keep the opcode.
    ops = []
    for ln in sass.splitlines():
        if "/*" not in ln:
            continue
        words = re.sub(r"^@!?U?P[T0-9]+\s+", "", re.sub(r"^.*?\*/\s*", "", ln).strip()).split()
        if words and words[0][:1].isupper():  # opcodes; data lines (".byte", ".word") are not
            ops.append(words[0])
    count = lambda prefix: sum(1 for op in ops if op.startswith(prefix))  # noqa: E731
    return {"registers": int(regs.group(1)) if regs else None,
            "local_bytes": int(local.group(1)) if local else None,
            "stack_bytes": int(stack.group(1)) if stack else None,
            "hgmma": count("HGMMA"), "hmma": count("HMMA"),
            "ldl": count("LDL"), "stl": count("STL"), "instructions": len(ops)}


def compile_call(head_dim: int, seq_len: int, heads: int, candidate: dict, arch: int) -> tuple[dict, list]:
    """Compile the forward and backward kernels of one bf16 call; (launch config, rows)."""
    B, D = 1, head_dim
    q, k, v = (torch.randn(B, heads, seq_len, D, dtype=torch.bfloat16) for _ in range(3))
    rows = []
    with override(**candidate):
        cfg = launch_config(D, torch.bfloat16)
        with compile_only(arch) as compiled:
            o, s_end, z_end, flags = triton_op.efficient_attn_fwd(q, k, v, *cfg)
            triton_op.efficient_attn_bwd(torch.randn_like(o), q, k, v, s_end, z_end, flags, *cfg)
    seen = set()
    for name, kwargs, kernel in compiled:
        variant = "fast" if kwargs.get("FAST") is True else "exact" if kwargs.get("FAST") is False else ""
        if (name, variant) in seen:
            continue
        seen.add((name, variant))
        facts = cubin_facts(kernel.asm["cubin"])
        warps = kernel.metadata.num_warps
        shared = kernel.metadata.shared
        regs = facts["registers"] or 1
        rows.append({"kernel": name, "variant": variant, "head_dim": D, "num_warps": warps,
                     "shared_bytes": shared, **facts,
                     "programs_per_sm_by_registers": REGISTERS_PER_SM // (regs * 32 * warps),
                     "programs_per_sm_by_shared": SHARED_PER_SM // shared if shared else None})
    return cfg._asdict(), rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90 = H100 / H200)")
    ap.add_argument("--candidate", type=lambda text: {} if text == "table" else parse_candidate(text),
                    action="append", default=None,
                    help="launch fields replaced, as benchmarks/tune_attention.py takes them, or 'table' for the "
                         "tuning table's entry; repeatable; default: the table's entry")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    for d in a.head_dim:
        if d not in HEAD_DIMS:
            ap.error(f"--head-dim {d} is not allowed: one of {', '.join(map(str, HEAD_DIMS))}")
    if not 75 <= a.arch <= 121:
        ap.error(f"--arch {a.arch} is not allowed: a CUDA compute capability Triton compiles for, 75 to 121 "
                 "(90 = H100 / H200)")
    if a.seq_len < 16 or a.seq_len % 16:
        ap.error(f"--seq-len {a.seq_len} is not allowed: a positive multiple of 16")
    results = []
    for d in a.head_dim:
        for cand in a.candidate or [{}]:
            cfg, rows = compile_call(d, a.seq_len, a.heads, cand, a.arch)
            for row in rows:
                print(json.dumps({"candidate": cand, **row}), flush=True)
            results.append({"head_dim": d, "candidate": cand, "launch": cfg, "kernels": rows})
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"arch": a.arch, "triton": triton.__version__, "torch": torch.__version__,
                       "command": "python " + " ".join(sys.argv), "calls": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
