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


@pytest.mark.parametrize("values", [["-1"], ["4"]], ids=["negative", "without_a_graph"])
def test_kv_splits_refused_negative_or_without_the_graph_step(tmp_path, capsys, values):
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
    assert [(r["kv_splits"], r["decode"], r["context"]) for r in rows] == [(0, "eager", 16)]
    assert out.exists()


def test_fused_projection_rows_decode_the_same_tokens(tmp_path):
    # One row per setting, in order (tests/inference/test_fused.py checks the logits).
    from benchmarks.inference import main

    rows = main(["--device", "cpu", "--flavor", "debugmodel", "--ratios", "0.5", "--contexts", "16",
                 "--decode-tokens", "3", "--fused-projections", "off", "on", "--out", str(tmp_path / "r.json")])
    assert [r["fused_projections"] for r in rows] == [False, True]


def test_gemv_rows_record_the_setting(tmp_path):
    # One row per setting, in order; on the CPU both take F.linear (tests/inference/test_gemv.py
    # checks the kernel's logits).
    from benchmarks.inference import main

    rows = main(["--device", "cpu", "--flavor", "debugmodel", "--ratios", "0.5", "--contexts", "16",
                 "--decode-tokens", "3", "--gemv", "on", "off", "--out", str(tmp_path / "r.json")])
    assert [r["gemv"] for r in rows] == [True, False]
    assert all(r["decode_ms_per_token"] > 0 for r in rows)


def test_profile_splits_each_step_into_what_ran(tmp_path):
    # On the CPU the events are the step's top-level operators. Per-step counts must hardly depend
    # on how many steps were profiled, the products must be among them, and the busy time cannot
    # exceed the step's own (the gap is what the step spent outside them).
    from benchmarks.inference import main

    rows = {}
    for n in (2, 4):
        (row,) = main(["--device", "cpu", "--flavor", "debugmodel", "--ratios", "0.5", "--contexts", "16",
                       "--decode-tokens", "2", "--profile-steps", str(n), "--out", str(tmp_path / f"p{n}.json")])
        rows[n] = row["profile"]
    two, four = rows[2], rows[4]
    assert two["steps"] == 2 and four["steps"] == 4
    # (a step that grows the KV cache into its next bucket runs a few more operators)
    assert two["events_per_step"] > 10 and abs(two["events_per_step"] - four["events_per_step"]) <= 0.1 * two["events_per_step"]
    assert 0 < two["matmul_ms_per_step"] <= two["busy_ms_per_step"]
    assert two["weights_gib"] > 0 and len(two["top"]) == 10
    assert all(t["calls_per_step"] > 0 and t["ms_per_step"] >= 0 for t in two["top"])
    assert sum(t["ms_per_step"] for t in four["top"]) <= four["busy_ms_per_step"] + 1e-3


def test_negative_profile_steps_refused(tmp_path, capsys):
    from benchmarks.inference import main

    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--flavor", "debugmodel", "--profile-steps", "-1", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert "--profile-steps -1 is not allowed" in capsys.readouterr().err
