"""Run folders as TorchTitan 0.2.2 writes them, built in a test's tmp dir: TensorBoard events with
its tags (written by torch's SummaryWriter, as TorchTitan's TensorBoardLogger does), complete and
cut checkpoints, run.json and evaluation JSON."""

import json
from pathlib import Path



def write_events(tb_dir: Path, train: dict, val: dict | None = None, tps: dict | None = None,
                 memory: dict | None = None, tokens_per_step: int = 512) -> None:
    """One events file under `tb_dir/<time>/`: {step: value} per tag."""
    from torch.utils.tensorboard import SummaryWriter

    tb_dir.mkdir(parents=True, exist_ok=True)
    w = SummaryWriter(str(tb_dir), max_queue=1000)
    for step, loss in sorted(train.items()):
        w.add_scalar("loss_metrics/global_avg_loss", loss, step)
        w.add_scalar("loss_metrics/global_max_loss", loss + 0.1, step)
        w.add_scalar("grad_norm", 1.0, step)
        w.add_scalar("throughput(tps)", (tps or {}).get(step, 1000.0), step)
        w.add_scalar("mfu(%)", (tps or {}).get(step, 1000.0) / 100, step)
        w.add_scalar("memory/max_reserved(GiB)", (memory or {}).get(step, 1.5), step)
        w.add_scalar("n_tokens_seen", step * tokens_per_step, step)
        w.add_scalar("lr", 1e-3, step)
    for step, loss in sorted((val or {}).items()):
        w.add_scalar("validation_metrics/loss", loss, step)
        w.add_scalar("validation_metrics/throughput(tps)", 2000.0, step)
    w.close()


def make_run(folder: Path, train: dict, val: dict | None = None, run_json: dict | None = None,
             checkpoints=(), cut_checkpoints=(), evals: dict | None = None, **events) -> Path:
    """A run folder: events under tb/<name>, checkpoint/step-N (with .metadata, or cut: without),
    run.json and eval/<stem>.json."""
    write_events(folder / "tb" / "20260101-0000", train, val, **events)
    for step in checkpoints:
        (folder / "checkpoint" / f"step-{step}").mkdir(parents=True)
        (folder / "checkpoint" / f"step-{step}" / ".metadata").write_bytes(b"x")
    for step in cut_checkpoints:
        (folder / "checkpoint" / f"step-{step}").mkdir(parents=True)
    if run_json is not None:
        (folder / "run.json").write_text(json.dumps(run_json))
    for stem, doc in (evals or {}).items():
        (folder / "eval").mkdir(exist_ok=True)
        (folder / "eval" / f"{stem}.json").write_text(json.dumps(doc))
    return folder


def sweep_run(parent: Path, ratio: float, seed: int, best: float, placement: str = "uniform",
              tps: float = 1000.0, memory: float = 1.0, steps: int = 20) -> Path:
    """A run of a ratio sweep on the debug config (run.json as the sweep driver writes it) whose
    validation loss falls to `best` at step steps // 2 and rises after it."""
    group = f"r{ratio:g}_{placement}"
    name = f"{group}_s{seed}"
    train = {s: best + 1.0 - 0.04 * s for s in range(1, steps + 1)}
    val = {s: best + abs(s - steps // 2) * 0.01 for s in range(2, steps + 1, 2)}
    return make_run(
        parent / name, train, val, tps={s: tps for s in train}, memory={s: memory for s in train},
        run_json={"name": name, "group": group, "base_config": "train_configs/debug_model.toml",
                  "overrides": {"model.linear_attn_ratio": ratio, "model.linear_attn_placement": placement,
                                "debug.seed": seed},
                  "seed": seed},
    )
