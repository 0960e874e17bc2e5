"""The hybrid model under TorchTitan's parallelisms and AC modes, on CPU through run_train.sh.

Each run trains 3 steps of the debug hybrid (layer map SLSLSL) starting from one seed
checkpoint (sharded random init differs between layouts, so the weights come from a
checkpoint, as TorchTitan recommends); the loss of step 1 must agree with a plain
one-process run on the same weights and batch, which shows the parallelize hook applied
each technique without changing the maths.
"""

import pytest

from tests.integration.harness import clean_env, losses_of, run_train, tail, SMALL

pytestmark = pytest.mark.integration

STEPS = ["--training.steps", "3"]


@pytest.fixture(scope="module")
def seed_args(tmp_path_factory):
    dump = tmp_path_factory.mktemp("seed")
    proc = run_train([*SMALL, "--job.dump_folder", str(dump), "--checkpoint.enable",
                 "--checkpoint.create_seed_checkpoint", "--parallelism.data_parallel_shard_degree", "1"])
    assert proc.returncode == 0, tail(proc.stdout)
    seed = dump / "checkpoint" / "step-0"
    assert (seed / ".metadata").is_file()
    return ["--checkpoint.enable", "--checkpoint.initial_load_path", str(seed)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, seed_args):
    dump = tmp_path_factory.mktemp("ref")
    proc = run_train([*SMALL, *STEPS, "--job.dump_folder", str(dump), *seed_args])
    assert proc.returncode == 0, tail(proc.stdout)
    return losses_of(proc.stdout)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, seed_args):
    """2-rank FSDP from the seed checkpoint: what DDP over the same two ranks must reproduce."""
    dump = tmp_path_factory.mktemp("fsdp2")
    proc = run_train([*SMALL, *STEPS, "--job.dump_folder", str(dump), *seed_args,
                      "--parallelism.data_parallel_shard_degree", "2"], env=clean_env(NGPU=2, LOG_RANK=0))
    assert proc.returncode == 0, tail(proc.stdout)
    return losses_of(proc.stdout)


CASES = {
    "ac_full": (1, 0, ["--activation_checkpoint.mode", "full"], "activation checkpointing"),
    "ac_selective_layer": (1, 0, ["--activation_checkpoint.mode", "selective",
                                  "--activation_checkpoint.selective_ac_option", "2"], "activation checkpointing"),
    "ac_selective_op": (1, 0, ["--activation_checkpoint.mode", "selective",
                               "--activation_checkpoint.selective_ac_option", "op"], "activation checkpointing"),
    "tp2": (2, 0, ["--parallelism.tensor_parallel_degree", "2",
                   "--parallelism.data_parallel_shard_degree", "1"], "Tensor Parallelism"),
    "pp2": (2, 1, ["--parallelism.pipeline_parallel_degree", "2",
                   "--parallelism.data_parallel_shard_degree", "1",
                   "--parallelism.pipeline_parallel_schedule", "1F1B"], "pipeline"),
    "ddp2": (2, 0, ["--parallelism.data_parallel_replicate_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1"], "Applied DDP"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parallelism_matches_plain_run(case, reference, seed_args, tmp_path, request):
    ngpu, log_rank, extra, marker = CASES[case]
    env = clean_env(NGPU=ngpu, LOG_RANK=log_rank)
    proc = run_train([*SMALL, *STEPS, "--job.dump_folder", str(tmp_path), *seed_args, *extra], env=env)
    assert proc.returncode == 0, tail(proc.stdout)
    assert marker.lower() in proc.stdout.lower(), tail(proc.stdout)
    losses = losses_of(proc.stdout, rank=log_rank)
    assert sorted(losses) == [1, 2, 3], tail(proc.stdout)
    if case == "ddp2":
        # Two replicas each see their own batch, so one process is no reference; FSDP over the
        # same two ranks is: same batches, and gradients summed over ranks (parallelize.py), so
        # the same losses and gradient norms step after step.
        fsdp = request.getfixturevalue("fsdp2")
        for step in (1, 2, 3):
            for got, want in zip(losses[step], fsdp[step]):
                assert got == pytest.approx(want, rel=2e-3), (step, losses, fsdp)
    else:
        assert abs(losses[1][0] - reference[1][0]) < 1e-3 * abs(reference[1][0]), (losses, reference)
