"""forward_ms: medians of interleaved rounds, in milliseconds, with autograd off."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from minipeft.timing import forward_ms


class Sleeper(nn.Module):
    """Takes a known time per call and records whether autograd was on."""

    def __init__(self, seconds: float, log: list | None = None) -> None:
        super().__init__()
        self.seconds, self.calls, self.grad_seen, self.log = seconds, 0, [], log if log is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.log.append(self)
        self.grad_seen.append(torch.is_grad_enabled())
        time.sleep(self.seconds)
        return x


def test_medians_in_milliseconds_interleaved_without_grad():
    log = []
    fast, slow = Sleeper(0.002, log), Sleeper(0.02, log)
    ms = forward_ms({"fast": fast, "slow": slow}, {"x": torch.ones(1)}, rounds=3)
    # Milliseconds (not seconds or microseconds), slow above fast; no tight upper bound: a busy machine oversleeps.
    assert 2 <= ms["fast"] < ms["slow"] and 20 <= ms["slow"] < 1000
    assert log == [fast, slow] * 4  # warm-up, then the rounds take turns
    assert not any(fast.grad_seen + slow.grad_seen) and not fast.training


def test_rounds_below_one():
    with pytest.raises(ValueError, match="at least one round"):
        forward_ms({"m": Sleeper(0)}, {"x": torch.ones(1)}, rounds=0)
