"""`python -m titan_linear.generate` on a checkpoint that run_train.sh really wrote (CPU, gloo).

Run with `pytest -q tests/integration/test_generate_cpu.py -m integration`.
"""

import re
import subprocess
import sys

import pytest

from tests.integration.harness import ckpt_args, clean_env, run_train, tail, DEBUG_TOML, REPO

pytestmark = pytest.mark.integration


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "titan_linear.generate", "--config", str(DEBUG_TOML), *args],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180,
    )


def test_generate_from_a_trained_checkpoint(tmp_path):
    dump = tmp_path / "dump"
    train = run_train(ckpt_args(dump, steps=3))
    assert train.returncode == 0, tail(train.stdout)
    ckpt = dump / "checkpoint" / "step-3"
    assert (ckpt / ".metadata").is_file()

    proc = _generate("--checkpoint", str(ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                     "--temperature", "0.8", "--top-k", "50", "--seed", "0", "--device", "cpu")
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"layer map SLSLSL, weights: {ckpt}" in out, out
    text = out.splitlines()[1]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:"), out
    assert re.search(r"^prefill: [0-9.]+ ms for \d+ prompt tokens$", out, re.M), out
    assert re.search(r"^decode: [0-9.]+ ms/token over \d+ steps, [0-9.]+ tokens/s; \d+ new tokens", out, re.M), out


def test_generate_missing_checkpoint_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no_such_dump" / "checkpoint" / "step-9"
    proc = _generate("--checkpoint", str(missing), "--prompt", "ROMEO:")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"titan_linear.generate: error: --checkpoint = {str(missing)!r} is not allowed: no such directory"
    ), proc.stderr
    assert proc.stdout == ""
