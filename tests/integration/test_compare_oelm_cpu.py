"""scripts/compare_oelm.py end to end on the CPU, tiny: both runs train, the table has the comparison's columns."""

import json
import re
import sys

import pytest

from tests.integration.harness import VALIDATION_LINE, run_train, strip_ansi, REPO

pytestmark = pytest.mark.integration


def test_compare_oelm_tiny(tmp_path):
    out = tmp_path / "cmp"
    argv = [sys.executable, str(REPO / "scripts" / "compare_oelm.py"), "--steps", "4", "--out", str(out),
            "--seq-len", "64", "--batch", "2", "--val-freq", "2", "--val-steps", "2", "--ngpu", "1",
            "--data", str(REPO / "titan_linear" / "assets" / "data" / "tinyshakespeare.txt"),
            "--", "--model.flavor", "debugmodel", "--metrics.no-enable-tensorboard", "--checkpoint.no-enable"]
    proc = run_train(argv, timeout=400, merge=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "comparison.md").read_text()
    assert "| Model | Val Loss | Val PPL | Relative gap (PPL) | Total params | Trainable params |" in md
    gpt = re.search(r"\| GPT \| ([0-9.]+) \| ([0-9.]+) \| baseline \| ([0-9,]+) \| ([0-9,]+) \(100.0%\) \|", md)
    oelm = re.search(r"\| OELM \| ([0-9.]+) \| ([0-9.]+) \| ([-+0-9.]+)% \| ([0-9,]+) \| ([0-9,]+) \(", md)
    assert gpt and oelm, md
    total = int(gpt.group(3).replace(",", ""))
    assert int(oelm.group(4).replace(",", "")) == total
    assert total - int(oelm.group(5).replace(",", "")) == 6 * 2 * 256 * 256  # W_q, W_k of 6 layers frozen
    data = json.loads((out / "comparison.json").read_text())
    assert data["tokens"] == 4 * 2 * 64
    assert 4 in map(int, data["gpt"]["val"]) and sorted(data["gpt"]["val"]) == sorted(data["oelm"]["val"])
    # read from the TensorBoard events: the validation losses TorchTitan printed (4 decimals)
    printed = {m.group(1): float(m.group(2)) for m in VALIDATION_LINE.finditer(strip_ansi((out / "gpt" / "train.log").read_text()))}
    assert printed == pytest.approx({s: round(v, 4) for s, v in data["gpt"]["val"].items()}, abs=1e-4)
    assert (out / "loss_curves.png").is_file() or "matplotlib is not installed" in proc.stdout
