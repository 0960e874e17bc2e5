"""benchmarks/inference.py refuses sizes below 1 before it builds anything: one line naming the
flag, exit 2, no output file."""

import pytest


@pytest.mark.parametrize("flag", ["--batches", "--contexts", "--decode-tokens"])
def test_sizes_below_one_are_refused(tmp_path, capsys, flag):
    from benchmarks.inference import main

    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--flavor", "debugmodel", flag, "0", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "'0' is not allowed: an integer >= 1" in err
