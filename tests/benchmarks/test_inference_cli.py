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


@pytest.mark.parametrize("values", [["0"], ["4"]], ids=["below_one", "without_a_graph"])
def test_kv_splits_refused_below_one_or_without_the_graph_step(tmp_path, capsys, values):
    # Splits change the CUDA-graph step only: asking for them on the CPU (eager steps) is an error,
    # not a row that silently measured the plain product.
    from benchmarks.inference import main

    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--flavor", "debugmodel", "--kv-splits", *values, "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--kv-splits" in err and values[0] in err


def test_cpu_rows_carry_kv_splits_and_are_written(tmp_path):
    from benchmarks.inference import main

    out = tmp_path / "rows.json"
    rows = main(["--device", "cpu", "--flavor", "debugmodel", "--ratios", "0.5", "--contexts", "16",
                 "--decode-tokens", "2", "--out", str(out)])
    assert [(r["kv_splits"], r["decode"], r["context"]) for r in rows] == [(1, "eager", 16)]
    assert out.exists()
