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


def test_train_step_runs_backward_in_turns_and_moves_nothing():
    from minipeft.models import tiny_gpt2
    from minipeft.timing import train_step_ms

    a, b = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    for p in b.parameters():
        p.requires_grad_(False)
    b.lm_head.weight.requires_grad_(True)  # tied to the embeddings: one trainable tensor
    named = lambda: [(f"{k}.{n}", p) for k, m in (("a", a), ("b", b)) for n, p in m.named_parameters()]
    before = {n: p.clone() for n, p in named()}
    calls = []
    for name, m in (("a", a), ("b", b)):
        m.register_forward_hook(lambda *_, name=name: calls.append(name))
    ids = torch.randint(0, 256, (2, 8))
    ms = train_step_ms({"a": a, "b": b}, {"input_ids": ids, "labels": ids}, rounds=2)
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert calls == ["a", "b"] * 3  # warm-up, then two rounds in turns
    assert all(p.grad is None for p in [*a.parameters(), *b.parameters()])  # cleared
    assert all(torch.equal(before[n], p) for n, p in named())  # no optimizer step
