"""Learning-rate schedules: linear warm-up, then linear decay, cosine decay, or a constant rate.

Warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD") raises the rate from 0 so the first
updates, taken while Adam's moment estimates are still poor, stay small; decaying to 0 at the last
step anneals the weights into a minimum (Loshchilov & Hutter 2017, SGDR, for the cosine shape).
The factors equal Hugging Face transformers' `get_{linear,cosine,constant}_schedule_with_warmup`.
"""

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("linear", "cosine", "constant")


def warmup_steps_from(warmup: float, total_steps: int) -> int:
    """Turn a warm-up setting into a number of optimizer steps.

    Args:
        warmup: a fraction of `total_steps` when < 1 (rounded up, as Hugging Face's `warmup_ratio`),
            otherwise a whole number of steps.
        total_steps: the number of optimizer steps of the whole run.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if warmup < 1:
        return math.ceil(warmup * total_steps)
    if warmup != int(warmup):
        raise ValueError(f"warmup >= 1 counts steps and must be a whole number, got {warmup}")
    return int(warmup)


@dataclass
class WarmupDecay:
    """The factor that multiplies the base learning rate before optimizer step `t` (counted from 0).

    With W warm-up steps and T total steps: t / W while t < W, then
    linear: (T - t) / (T - W);  cosine: (1 + cos(pi (t - W) / (T - W))) / 2;  constant: 1.
    Like Hugging Face, the factor is 0 at t = 0 when W > 0; past T it stays 0 (Hugging Face's cosine
    would rise again, but the loop never steps past T).
    """

    schedule: str
    warmup_steps: int
    total_steps: int

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) and total_steps ({self.total_steps}) must be >= 0"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        if self.schedule == "linear":
            return max(0.0, (self.total_steps - step) / decay_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)  # stay at 0 after T
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A `LambdaLR` that applies `WarmupDecay(schedule, warmup_steps, total_steps)` to every group.

    Call `scheduler.step()` once after each `optimizer.step()`. Its `state_dict()` holds only numbers,
    so it can be stored as JSON in a checkpoint.
    """
    return LambdaLR(optimizer, WarmupDecay(schedule, warmup_steps, total_steps))
