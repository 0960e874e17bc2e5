"""The Triton path (efficient_attention_triton) against the quadratic fp32 reference.

On a CUDA machine the kernels run compiled (tests/test_gpu.py has the bf16 and compile checks).
Without a GPU they run under Triton's interpreter, which must be switched on before triton is
first imported, so each case runs in a child process with TRITON_INTERPRET=1: the same kernel
code, executed in numpy, checked to fp32 accuracy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# (B, H, H_kv, T, D, key_scale): one chunk with padding; three chunks (two scan steps) with
# grouped-query heads; keys x100 over two chunks; T = 1.
CASES = [
    (1, 2, 2, 37, 16, 1.0),
    (2, 4, 2, 300, 16, 1.0),
    (1, 2, 1, 200, 16, 100.0),
    (1, 2, 2, 1, 16, 1.0),
]


def _errors(B, H, Hkv, T, D, key_scale, device="cpu") -> dict:
    """Relative errors of o, dq, dk, dv (fp32 kernels against the fp64 quadratic reference)."""
    from titan_linear.ops.efficient_attn import efficient_attention_quadratic, efficient_attention_triton

    g = torch.Generator().manual_seed(T * 31 + H)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) * key_scale
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    results = []
    for fn, dtype in ((efficient_attention_quadratic, torch.float64), (efficient_attention_triton, torch.float32)):
        leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, do.to(device, dtype))
        results.append([x.detach().double().cpu() for x in (out, *grads)])
    errors = {}
    for name, ref, got in zip(("o", "dq", "dk", "dv"), *results):
        # Gradients that vanish exactly (dq, dk at T = 1) are measured against do's scale.
        scale = max(ref.norm().item(), 1e-2 * do.norm().item())
        errors[name] = (got - ref).norm().item() / scale if torch.isfinite(got).all() else float("inf")
    return errors


# Ordinary keys with the same-sub-chunk block forced onto its exact per-key loop
# (TITAN_LINEAR_TRITON_SPAN=-1); CASES at ordinary scale take the tensor-core products.
EXACT_CASE = (1, 4, 2, 150, 16, 1.0)


def _interpret(cases: list, **env) -> list[dict]:
    """_errors of each case in one child process (importing torch and triton once costs ~7 s)."""
    pytest.importorskip("triton")
    code = f"import json, tests.test_triton_attn as t; print(json.dumps([t._errors(*c) for c in {cases!r}]))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted_errors() -> list[dict]:
    return _interpret(CASES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: tests/test_gpu.py runs the compiled kernels")
@pytest.mark.parametrize("index", range(len(CASES)), ids=["B{}-H{}-Hkv{}-T{}-D{}-x{:g}".format(*c) for c in CASES])
def test_efficient_attention_triton_interpreted_matches_quadratic(interpreted_errors, index):
    errors = interpreted_errors[index]
    # fp32 kernels against an fp64 reference; keys x100 lose a little in z (|z| ~ 100s).
    tol = 1e-4 if CASES[index][-1] > 10 else 1e-5
    assert all(e < tol for e in errors.values()), errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: tests/test_gpu.py runs the compiled kernels")
def test_efficient_attention_triton_interpreted_exact_loop_matches_quadratic():
    (errors,) = _interpret([EXACT_CASE], TITAN_LINEAR_TRITON_SPAN="-1")
    assert all(e < 1e-5 for e in errors.values()), errors
