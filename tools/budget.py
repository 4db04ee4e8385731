"""The steps of a training run that must fit a time budget (the GPU machine is lent by the minute),
and the checks of the training scripts' numeric options."""

import time

import torch


def clock(device):
    """Seconds, once the device has done the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.monotonic()


class StepBudget:
    """At most `steps` steps and `minutes` minutes. Steps timed_from..plan_at are timed (the first
    ones warm the device up); then `total`, which the learning-rate schedule reads, shrinks to what
    the time left holds, with 5 % spare. `done` counts the steps run."""

    def __init__(self, steps, minutes, device, timed_from, plan_at, log):
        self.total, self.device, self.log = steps, device, log
        self.timed_from, self.plan_at = timed_from, plan_at
        self.begin = clock(device)
        self.deadline = self.begin + 60 * minutes
        self.done = 0

    def __iter__(self):
        while self.done < self.total and time.monotonic() < self.deadline:
            if self.done == self.timed_from:
                timed = clock(self.device)
            if self.done == self.plan_at:
                now = clock(self.device)
                per_step = (now - timed) / (self.plan_at - self.timed_from)
                self.total = min(self.total, self.plan_at + int(0.95 * (self.deadline - now) / per_step))
                self.log(f"{per_step:.3f} s per step: {self.total} steps in the time given")
            yield self.done
            self.done += 1

    def elapsed(self):
        return time.monotonic() - self.begin


def check_options(p, args, counts=(), amounts=()):
    """p.error (one line, exit 2) for the first of args' `counts` below 1 or `amounts` at or below 0,
    named by its flag."""
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in amounts:
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be above 0")
