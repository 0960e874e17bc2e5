"""benchmarks/attention_share.py: kernel times of a profiler trace sorted into softmax attention,
linear attention and the rest."""

import gzip
import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import attention_share  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trace(path, kernels):
    events = [{"ph": "X", "cat": "kernel", "name": n, "dur": d} for n, d in kernels]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 10_000})  # not a kernel: ignored
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_shares_of_a_trace(tmp_path):
    it = tmp_path / "profile_traces" / "iteration_10"
    it.mkdir(parents=True)
    _trace(str(it / "rank0_trace.json.gz"), [
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", 1500.0),
        ("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", 2500.0),
        ("chunk_output_kernel", 1000.0), ("bwd_key_kernel", 1000.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 4000.0),
    ])
    out = tmp_path / "share.json"
    assert attention_share.main([str(tmp_path), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["kernel_ms"] == 10.0
    assert row["softmax_attention_ms"] == 4.0 and row["softmax_attention_share"] == 0.4
    assert row["linear_attention_ms"] == 2.0 and row["linear_attention_share"] == 0.2


def test_linear_kernel_names_are_the_triton_kernels():
    # The list must follow the kernels: a renamed or added kernel would otherwise count as "other".
    src = ""
    folder = os.path.join(ROOT, "titan_linear", "ops", "efficient_attn")
    for name in os.listdir(folder):
        if name.endswith(".py"):
            src += open(os.path.join(folder, name)).read()
    defined = set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", src))
    assert defined == set(attention_share.LINEAR_KERNELS)


def test_folder_without_traces_is_refused(tmp_path, capsys):
    out = tmp_path / "share.json"
    with pytest.raises(SystemExit) as e:
        attention_share.main([str(tmp_path), "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path) in err and "no rank*_trace.json under it" in err
