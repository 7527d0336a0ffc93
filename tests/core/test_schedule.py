"""Tests for tunelab/core/schedule.py: closed-form values and parity with Hugging Face transformers."""

import math

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from tunelab.core.schedule import WarmupDecay, make_scheduler, warmup_steps_from


def test_linear_closed_form():
    factor = WarmupDecay("linear", warmup_steps=2, total_steps=10)
    assert [factor(t) for t in range(12)] == [0.0, 0.5, 1.0] + [(10 - t) / 8 for t in range(3, 11)] + [0.0]


def test_cosine_closed_form():
    factor = WarmupDecay("cosine", warmup_steps=4, total_steps=12)
    assert [factor(t) for t in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert factor(4) == 1.0 and factor(12) == 0.0 and factor(20) == 0.0
    assert math.isclose(factor(8), 0.5)  # halfway through the decay
    assert math.isclose(factor(6), (1 + math.cos(math.pi / 4)) / 2)


def test_constant_closed_form():
    factor = WarmupDecay("constant", warmup_steps=3, total_steps=10)
    assert [factor(t) for t in (0, 1, 3, 10, 50)] == [0.0, 1 / 3, 1.0, 1.0, 1.0]
    assert WarmupDecay("linear", 0, 4)(0) == 1.0  # no warm-up: start at the full rate


@pytest.mark.parametrize("schedule, reference", [
    ("linear", lambda opt, w, t: get_linear_schedule_with_warmup(opt, w, t)),
    ("cosine", lambda opt, w, t: get_cosine_schedule_with_warmup(opt, w, t)),
    ("constant", lambda opt, w, t: get_constant_schedule_with_warmup(opt, w)),
])
@pytest.mark.parametrize("warmup_steps, total_steps", [(0, 7), (3, 20), (5, 5)])
def test_matches_transformers(schedule, reference, warmup_steps, total_steps):
    ours_params, theirs_params = [torch.nn.Parameter(torch.ones(2))], [torch.nn.Parameter(torch.ones(2))]
    ours_opt, theirs_opt = torch.optim.AdamW(ours_params, lr=3e-4), torch.optim.AdamW(theirs_params, lr=3e-4)
    ours = make_scheduler(ours_opt, schedule, warmup_steps, total_steps)
    theirs = reference(theirs_opt, warmup_steps, total_steps)
    for _ in range(total_steps + 1):  # every step of a run, and the rate after the last one
        ours_lr, theirs_lr = ours_opt.param_groups[0]["lr"], theirs_opt.param_groups[0]["lr"]
        assert math.isclose(ours_lr, theirs_lr, rel_tol=1e-12, abs_tol=1e-15)
        ours_opt.step(), theirs_opt.step()
        ours.step(), theirs.step()


def test_warmup_steps_from_fraction_or_count():
    assert warmup_steps_from(0.1, 95) == 10  # rounded up, like Hugging Face's warmup_ratio
    assert warmup_steps_from(0, 95) == 0
    assert warmup_steps_from(5, 95) == 5
    with pytest.raises(ValueError, match="whole number"):
        warmup_steps_from(2.5, 95)
    with pytest.raises(ValueError, match=">= 0"):
        warmup_steps_from(-0.1, 95)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of"):
        WarmupDecay("step", 0, 10)


def test_scheduler_state_is_json_numbers():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", 2, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["last_epoch"] == 3 and state["lr_lambdas"] == [
        {"schedule": "cosine", "warmup_steps": 2, "total_steps": 10}]
