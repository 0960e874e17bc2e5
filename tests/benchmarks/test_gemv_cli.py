"""benchmarks/gemv.py: its sweep's candidates are launches the kernel takes, and it refuses batches
the kernel does not take before timing anything."""

import pytest

from titan_linear.ops import gemv


def test_sweep_candidates_are_valid_launches_covering_split_k():
    from benchmarks.gemv import candidates, SHAPES

    for name, n, k in SHAPES:
        for rows in (1, 4, 16):
            cands = list(candidates(rows, n, k, sms=132))
            assert cands and all(gemv.check(c, rows, n, k) == c for c in cands)
            assert {c.dot for c in cands} == ({False, True} if rows == 1 else {True})
            if name in ("wo", "w2"):  # few row tiles: every split is tried
                assert {c.split for c in cands} == {1, 2, 4, 8, 16}
    # the output head's 8016 tiles of 16 rows: at most 2 slices
    assert max(c.split for c in candidates(1, 128256, 2048, sms=132)) == 2


@pytest.mark.parametrize("batch", ["0", "17"])
def test_batches_past_the_kernel_are_refused(tmp_path, capsys, batch):
    from benchmarks.gemv import main

    out = tmp_path / "g.json"
    with pytest.raises(SystemExit) as e:
        main(["--batches", batch, "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert f"--batches {batch} is not allowed: 1 to 16" in capsys.readouterr().err
