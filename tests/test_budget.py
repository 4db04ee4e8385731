"""tools/budget.py: a training loop's steps within a step count and a time budget."""

import sys
import time

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from budget import StepBudget  # noqa: E402

CPU = torch.device("cpu")


def test_the_step_count_bounds_a_fast_loop():
    budget = StepBudget(5, 10, CPU, 1, 3, print)
    assert list(budget) == [0, 1, 2, 3, 4] and budget.done == 5


def test_the_count_shrinks_to_what_the_time_holds():
    """Steps of 50 ms in 0.6 s: timed over steps 1-3, the plan is 3 + floor(0.95 * 0.45 s / 50 ms) = 11
    steps (a step or so either way for the timer's jitter), far below the 1000 asked."""
    logged = []
    budget = StepBudget(1000, 0.01, CPU, 1, 3, logged.append)
    for _ in budget:
        time.sleep(0.05)
    assert 9 <= budget.total <= 12 and budget.done <= budget.total
    assert len(logged) == 1 and logged[0].endswith(f"{budget.total} steps in the time given")


def test_no_time_no_steps():
    assert list(StepBudget(10, 0, CPU, 1, 3, print)) == []
