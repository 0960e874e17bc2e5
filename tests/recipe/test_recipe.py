"""The recipe: LR schedules against their formulas, AdamW groups, NaN/Inf loss stop, grad-norm warning."""

import math
import re

import pytest
import torch
from torch import nn
from torchtitan.config import LRScheduler as TTLRScheduler, Optimizer as TTOptimizer

from titan_linear.recipe import (
    build_grouped_optimizers, check_finite_loss, build_recipe_lr_schedulers, check_finite_weights,
    checked_grad_norm, check_schedule_config, no_decay, NonFiniteError,
)
from titan_linear.recipe.monitor import MonitoredMetricsProcessor, NonFiniteLossError


def _lr_config(**kw):
    cfg = TTLRScheduler()
    extra = dict(schedule="torchtitan", min_lr_ratio=None, restart_interval=None, power=None)
    extra.update(kw)
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def _lrs(cfg, steps: int, base_lr: float = 1e-3) -> list[float]:
    """The lr that each training step 1..steps uses, as torchtitan's loop reads it."""
    model = nn.Linear(2, 2)
    opt = build_grouped_optimizers([model], TTOptimizer(lr=base_lr, implementation="for-loop"), None)
    sched = build_recipe_lr_schedulers(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(sched.schedulers[0].get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def _torchtitan_lrs(cfg, steps: int, base_lr: float) -> list[float]:
    from torchtitan.components.lr_scheduler import build_lr_schedulers

    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=base_lr)
    ref = build_lr_schedulers([opt], cfg, steps)
    out = []
    for _ in range(steps):
        out.append(ref.schedulers[0].get_last_lr()[0])
        opt.step()
        ref.step()
    return out


def test_deprecated_cosine_is_torchtitans_cosine_with_its_floor():
    W, T, m, lr = 40, 1000, 0.1, 5e-4  # oelm_small.toml's schedule, scaled down
    old = _lr_config(schedule="cosine", warmup_steps=W, min_lr_ratio=m)
    notes = check_schedule_config(old)
    assert any("schedule = 'cosine' is deprecated" in n for n in notes)
    assert any("min_lr_ratio is deprecated" in n for n in notes)
    assert (old.schedule, old.decay_type, old.min_lr_factor) == ("torchtitan", "cosine", m)
    new = _lr_config(warmup_steps=W, decay_type="cosine", min_lr_factor=m)
    assert _lrs(_lr_config(schedule="cosine", warmup_steps=W, min_lr_ratio=m), T, lr) == pytest.approx(
        _torchtitan_lrs(new, T, lr))
    lrs = _lrs(new, T, lr)
    assert min(lrs[W:]) >= lr * m - 1e-12 and lrs[W - 1] == pytest.approx(lr)


def test_cosine_restarts_matches_formula():
    W, T, R, m, lr = 80, 3000, 1000, 0.1, 3e-4  # oelm_base.toml's schedule, scaled down
    lrs = _lrs(_lr_config(schedule="cosine_restarts", warmup_steps=W, min_lr_factor=m, restart_interval=R), T, lr)
    for s in (80, 500, 1079, 1080, 1081, 2080, 2999):
        c = ((s - W) % R) / R
        assert lrs[s] == pytest.approx(lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * c))))
    assert lrs[1080] == pytest.approx(lr) and lrs[2080] == pytest.approx(lr)  # restarts
    assert lrs[1079] < 0.11 * lr


def test_polynomial_matches_formula():
    W, T, m, power, lr = 120, 5000, 0.05, 2.0, 2e-4  # oelm_large.toml's schedule, scaled down
    lrs = _lrs(_lr_config(schedule="polynomial", warmup_steps=W, min_lr_factor=m, power=power), T, lr)
    for s in (120, 777, 2500, 4999):
        p = (s - W) / (T - W)
        # lr = (base_lr - min_lr) * (1 - p) ** power + min_lr
        assert lrs[s] == pytest.approx((lr - m * lr) * (1 - p) ** power + m * lr)


def test_torchtitan_schedule_is_untouched():
    cfg = _lr_config(warmup_steps=5, decay_type="cosine", min_lr_factor=0.2)
    assert _lrs(cfg, 50, 1.0) == pytest.approx(_torchtitan_lrs(cfg, 50, 1.0))


def test_short_run_clamps_warmup_without_torchtitans_warning(caplog, monkeypatch):
    import logging

    from torchtitan.tools.logging import logger

    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO):
        lrs = _lrs(_lr_config(warmup_steps=200), 20, 1.0)
    assert not any("exceed" in r.getMessage() for r in caplog.records)
    assert lrs[-1] == pytest.approx(1.0) and lrs[0] == pytest.approx(1 / 20)


@pytest.mark.parametrize("kw, key", [
    (dict(schedule="step"), "lr_scheduler.schedule = 'step'"),
    (dict(schedule="bogus"), "lr_scheduler.schedule = 'bogus'"),
    (dict(min_lr_factor=2.0), "lr_scheduler.min_lr_factor = 2.0"),
    (dict(power=2.0), "lr_scheduler.power = 2.0 is not allowed: unset unless lr_scheduler.schedule = 'polynomial'"),
    (dict(restart_interval=10), "lr_scheduler.restart_interval = 10 is not allowed: unset unless"),
    (dict(schedule="polynomial", power=-1.0), "lr_scheduler.power = -1.0"),
    (dict(schedule="polynomial", decay_ratio=0.5), "lr_scheduler.decay_ratio = 0.5 is not allowed: unset with"),
    (dict(schedule="cosine_restarts", decay_type="sqrt"), "lr_scheduler.decay_type = 'sqrt'"),
])
def test_schedule_keys_that_would_be_ignored_are_refused(kw, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        check_schedule_config(_lr_config(**kw))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.ffn_norm = nn.RMSNorm(4)
        self.frozen = nn.Linear(4, 4, bias=False)
        self.frozen.weight.requires_grad_(False)


def test_adamw_groups_betas_eps_and_no_decay():
    model = _Tiny()
    cfg = TTOptimizer(lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.01, implementation="for-loop")
    opt = build_grouped_optimizers([model], cfg, None)
    groups = opt.optimizers[0].param_groups
    assert isinstance(opt.optimizers[0], torch.optim.AdamW)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[0]["params"]) == ["proj.weight", "tok_embeddings.weight"]
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["ffn_norm.weight", "proj.bias"]
    assert no_decay("layers.0.attention_norm.weight", torch.empty(4)) and not no_decay("output.weight", torch.empty(2, 2))
    # a weight-decay-only step (zero gradients) leaves the no-decay group untouched
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(before["proj.bias"], after["proj.bias"]) and torch.equal(before["ffn_norm.weight"], after["ffn_norm.weight"])
    assert not torch.equal(before["proj.weight"], after["proj.weight"])
    assert torch.equal(before["frozen.weight"], after["frozen.weight"])
    # checkpoint state: the container's flattened state dict round-trips with both groups
    sd = opt.state_dict()
    assert not any(k.startswith("state.frozen") for k in sd)
    opt.load_state_dict(sd)
    assert [g["weight_decay"] for g in opt.optimizers[0].param_groups] == [0.01, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_raises(bad):
    check_finite_loss(torch.tensor(2.5))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \((nan|inf)\)"):
        check_finite_loss(torch.tensor(bad))


def test_grad_norm_spike_is_logged_as_warning(caplog, monkeypatch):
    import logging

    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.tools.logging import logger

    monkeypatch.setattr(MetricsProcessor, "log", lambda *a, **k: None)
    proc = MonitoredMetricsProcessor.__new__(MonitoredMetricsProcessor)
    proc.grad_norm_warn = 100.0
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING):
        proc.log(7, 3.2, 3.3, 12.0)
        assert not caplog.records
        proc.log(8, 3.2, 3.3, 250.0)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "step 8" in msg and "250" in msg and "monitor.grad_norm_warn = 100" in msg


def test_nonfinite_grad_norm_raises_before_the_optimizer_step():
    """Inside the block TorchTitan's clip_grad_norm_ raises on a NaN/Inf norm; outside it is restored."""
    import torchtitan.train as tt_train

    clip = tt_train.dist_utils.clip_grad_norm_
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    with checked_grad_norm(), pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\)"):
        tt_train.dist_utils.clip_grad_norm_([p], 1.0, foreach=True)
    assert tt_train.dist_utils.clip_grad_norm_ is clip
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    with checked_grad_norm():
        assert float(tt_train.dist_utils.clip_grad_norm_([p], 1.0, foreach=True)) == pytest.approx(5.0)
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    with checked_grad_norm(enabled=False):
        assert not math.isfinite(float(tt_train.dist_utils.clip_grad_norm_([p], 1.0, foreach=True)))


def test_nonfinite_weights_are_never_saved():
    model = _Tiny()
    check_finite_weights([model], 3)
    with torch.no_grad():
        model.proj.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite weights \(proj.bias\) after step 4"):
        check_finite_weights([model], 4)


def test_progress_line_gives_step_of_total_and_eta(caplog, monkeypatch):
    import logging

    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.tools.logging import logger

    monkeypatch.setattr(MetricsProcessor, "log", lambda *a, **k: None)
    proc = MonitoredMetricsProcessor.__new__(MonitoredMetricsProcessor)
    proc.grad_norm_warn, proc.total_steps = 100.0, 40
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO):
        proc.log(10, 3.2, 3.3, 1.0)
        proc.log(20, 3.1, 3.2, 1.0)
    lines = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
    assert lines[0].endswith("step 10/40 (25 %)")
    assert re.fullmatch(r"titan_linear progress: step 20/40 \(50 %\), ETA \d+:\d\d:\d\d", lines[1])
