"""scripts/integration_matrix.py: TorchTitan's integration matrix on the hybrid.

On the CPU: the case selection and layer maps (no runs), a bad flag, and the dry mode end to
end on three cheap cases (2-rank FSDP training, the context-parallel refusal, a checkpoint
saved under PP 2 and resumed in one process). The cases that need more ranks or CUDA run one
pytest item each on a machine with enough GPUs, and skip without them.
"""

import importlib.util
import json

import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "integration_matrix.py"
spec = importlib.util.spec_from_file_location("integration_matrix", SCRIPT)
matrix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(matrix)

DRY_CASES = ["fsdp2", "cp2", "ckpt_pp2_to_single"]


def boundaries(layout) -> list[int]:
    """First layer index of every pipeline stage after the first (TorchTitan's split)."""
    from torchtitan.distributed.pipeline_parallel import generate_llm_fqn_per_model_part

    parts = generate_llm_fqn_per_model_part(layout.stages, matrix.N_LAYERS)
    return [min(int(m.split(".")[1]) for m in p if m.startswith("layers.")) for p in parts[1:]
            if any(m.startswith("layers.") for m in p)]


@pytest.mark.parametrize("case", [c for c in matrix.CASES if c.layout.pp > 1], ids=lambda c: c.name)
def test_layer_map_puts_linear_layers_on_stage_boundaries(case):
    linear = matrix.layer_map(case.layout)
    assert len(linear) == matrix.N_LAYERS // 2  # ratio 0.5
    for b in boundaries(case.layout):
        assert b - 1 in linear or b in linear, (case.name, b, linear)


def test_every_case_runs_or_says_why_not():
    names = [c.name for c in matrix.CASES]
    assert len(set(names)) == len(names)
    for c in matrix.CASES:
        assert c.upstream, c.name
        reason = matrix.skip_reason(c, matrix.DRY_NGPU, dry=True)
        if c.not_applicable:
            assert reason.startswith("not applicable"), c.name
        elif c.ngpu > 2:
            assert reason == f"needs {c.ngpu} ranks; --dry-cpu runs 2 gloo ranks", c.name
        elif c.needs:
            assert reason and "needs" in reason, c.name
        else:
            assert reason is None, c.name
        if c.resume:  # the same batches before and after the resume
            assert c.layout.dp == c.resume.dp, c.name
    # all 8 GPUs: every applicable case without special hardware is selected
    runnable = [c for c in matrix.CASES if not c.not_applicable and not c.needs]
    assert all(matrix.skip_reason(c, 8, dry=False) is None for c in runnable)


def test_unknown_case_is_one_line_and_exit_2(capsys):
    assert matrix.main(["--list", "--cases", "fsdp2", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--cases = 'nope' is not allowed" in err and "fsdp2" in err


@pytest.mark.integration
def test_dry_cpu_cases(tmp_path):
    assert matrix.main(["--dry-cpu", "--cases", *DRY_CASES, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    results = {r["case"]: r for r in doc["results"]}
    assert sorted(results) == sorted(DRY_CASES)
    assert all(r["status"] == "passed" for r in results.values()), results
    fsdp = results["fsdp2"]
    assert fsdp["last_loss"] < fsdp["first_loss"] - matrix.LOSS_DROP
    assert "refused as expected: titan_linear: error: parallelism.context_parallel_degree = 2" in results["cp2"]["error"]
    ckpt = results["ckpt_pp2_to_single"]["detail"]
    resumed = {int(s): v for s, v in ckpt["resumed"].items()}
    assert sorted(resumed) == list(range(matrix.CKPT_AT + 1, matrix.CKPT_STEPS + 1))
    for s, v in resumed.items():
        assert v == pytest.approx(ckpt["uninterrupted"][str(s)], rel=matrix.RESUME_RTOL)
    table = (tmp_path / "results.md").read_text()
    assert "| fsdp2 | 2 | passed |" in table and "3 passed, 0 failed, 0 skipped" in table


GPU_CASES = [c for c in matrix.CASES if not c.not_applicable and (c.ngpu > 2 or c.needs)]


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_case_on_gpus(case, tmp_path):
    if torch.cuda.device_count() < case.ngpu:
        pytest.skip(f"needs {case.ngpu} GPUs, {torch.cuda.device_count()} here")
    reason = matrix.skip_reason(case, torch.cuda.device_count(), dry=False)
    if reason:
        pytest.skip(reason)
    r = matrix.run_case(case, str(tmp_path), dry=False, timeout=900)
    assert r.status == "passed", r.error
