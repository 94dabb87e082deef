"""The experiment harness: intervals against closed forms, the learning-rate rule against its shipped sweep, the seed
grid written, read back and checked against a live run, and the baselines' trainable counts in closed form."""

import csv
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

from minipeft import experiment
from minipeft.experiment import Experiment, Result, full_fine_tuning, learning_rate, linear_probe, t_critical
from minipeft.models import load_classifier

ROOT = Path(__file__).parent.parent


def test_t_quantiles_match_closed_forms():
    # df=1 is the Cauchy quantile tan(pi (p - 1/2)); df=2 has t = (2p - 1) / sqrt(2 p (1 - p)).
    p = 0.975
    assert t_critical(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-3)
    assert t_critical(2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), abs=1e-3)
    values = [t_critical(df) for df in range(1, 200)]
    assert values == sorted(values, reverse=True) and 1.96 < values[-1] < 1.975  # tends to the normal's 1.96
    assert t_critical(30) == pytest.approx(2.042, abs=3e-3)  # a printed table's value beyond ours
    with pytest.raises(ValueError, match="at least two seeds"):
        t_critical(0)


def test_result_interval_is_t_times_standard_error():
    acc = [0.50, 0.55, 0.47, 0.52, 0.61]
    r = Result("m", [0, 1, 2, 3, 4], acc, trainable=10)
    hand = 2.776 * statistics.stdev(acc) / math.sqrt(5)
    assert r.mean == pytest.approx(sum(acc) / 5)
    assert r.half_width == pytest.approx(hand)
    assert r.interval == pytest.approx((r.mean - hand, r.mean + hand))
    assert str(r) == f"{100 * r.mean:.1f} ± {100 * hand:.1f}"
    assert Result("one", [0], [0.5], 1).half_width == 0.0


def test_learning_rates_are_what_the_shipped_sweep_chose():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sweep_lr

    rows = list(csv.DictReader(open(ROOT / "benchmarks" / "results" / "lr_sweep.csv")))
    assert {r["date"] for r in rows} and all(r["machine"] for r in rows)
    rule = sweep_lr.chosen(rows)
    assert set(rule) == {*sweep_lr.CONFIGS, "FULL", "PROBE"}
    for method, lr in rule.items():
        assert learning_rate(method) == lr, method
    # Every rate of the grid was tried with every seed, for every method.
    for method in rule:
        tried = {(float(r["lr"]), int(r["seed"])) for r in rows if r["method"] == method}
        rates = sweep_lr.FULL_RATES if method == "FULL" else sweep_lr.RATES
        assert tried == {(lr, s) for lr in rates for s in sweep_lr.SEEDS}, method


def test_learning_rate_by_config_and_unknown():
    import minipeft as mp

    assert learning_rate(mp.LoraConfig(r=2)) == learning_rate("LORA")
    assert learning_rate(None) == learning_rate("FULL")
    assert learning_rate(mp.DiffPruningConfig(sparsity=0.01)) == learning_rate("FISHMASK")  # the alias
    assert set(experiment.LEARNING_RATES).isdisjoint(experiment.ALIASES)
    with pytest.raises(KeyError, match="no learning rate for 'NOPE'"):
        learning_rate("NOPE")


def fake(values):
    """A train function whose accuracy per seed is given: the harness, not a model, is under test."""
    return lambda seed: values[seed]


def test_grid_written_then_read_and_checked_against_live(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_GRID_DIR", str(tmp_path))
    values = {0: 0.50, 1: 0.60, 2: 0.55}
    monkeypatch.setenv("MINIPEFT_SEEDS", "0,1,2")
    monkeypatch.setenv("MINIPEFT_GRID", "write")
    Experiment("ch").run("m", fake(values), trainable=7, lr=0.01, steps=40)
    rows = list(csv.DictReader(open(tmp_path / "ch.csv")))
    assert [(int(r["seed"]), float(r["accuracy"])) for r in rows] == list(values.items())
    assert all(r["date"] and r["machine"] and r["torch"] for r in rows)

    monkeypatch.setenv("MINIPEFT_SEEDS", "0")
    monkeypatch.setenv("MINIPEFT_GRID", "read")
    exp = Experiment("ch")
    r = exp.run("m", fake(values), trainable=7, lr=0.01, steps=40)
    assert r.accuracy == list(values.values()) and r.live == 0.50 and exp.mismatches() == {}
    # A live run inside the grid's spread widened by the tolerance passes; one outside it is reported.
    near = Experiment("ch")
    near.run("m", fake({0: 0.61}), trainable=7, lr=0.01, steps=40)
    assert near.mismatches() == {}
    drifted = Experiment("ch")
    drifted.run("m", fake({0: 0.47}), trainable=7, lr=0.01, steps=40)
    assert drifted.mismatches() == {"m": (0.47, 0.50, 0.60)}
    # A changed setup, a changed count or a run the grid lacks cannot be read from it.
    with pytest.raises(LookupError, match="was computed with"):
        Experiment("ch").run("m", fake(values), trainable=7, lr=0.02, steps=40)
    with pytest.raises(LookupError, match="was computed with"):
        Experiment("ch").run("m", fake(values), trainable=8, lr=0.01, steps=40)
    with pytest.raises(LookupError, match="has no run 'other'"):
        Experiment("ch").run("other", fake(values), trainable=7, lr=0.01, steps=40)
    with pytest.raises(ValueError, match="exists already"):
        exp.run("m", fake(values), trainable=7, lr=0.01, steps=40)


def test_live_mode_runs_every_seed_and_bad_settings_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIPEFT_GRID_DIR", str(tmp_path))
    monkeypatch.setenv("MINIPEFT_GRID", "live")
    monkeypatch.setenv("MINIPEFT_SEEDS", "3,4")
    r = Experiment("ch").run("m", fake({3: 0.4, 4: 0.6}), trainable=1)
    assert r.seeds == [3, 4] and r.accuracy == [0.4, 0.6]
    assert not (tmp_path / "ch.csv").exists()  # live runs write nothing
    monkeypatch.setenv("MINIPEFT_SEEDS", "0,x")
    with pytest.raises(ValueError, match="MINIPEFT_SEEDS must be integers"):
        Experiment("ch")
    monkeypatch.setenv("MINIPEFT_SEEDS", "0")
    monkeypatch.setenv("MINIPEFT_GRID", "sometimes")
    with pytest.raises(ValueError, match="MINIPEFT_GRID must be"):
        Experiment("ch")


def test_each_seed_reseeds_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIPEFT_GRID", "live")
    monkeypatch.setenv("MINIPEFT_SEEDS", "5,5")
    draws = []  # the same seed twice: each call is seeded first, so both draw the same
    Experiment("ch").run("m", lambda seed: draws.append(torch.rand(1).item()) or 0.5, trainable=1)
    assert draws[0] == draws[1]


def test_baselines_train_what_they_say():
    model, _ = load_classifier(6)
    total = sum(p.numel() for p in model.parameters())
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable(full_fine_tuning(model)) == total - emb
    assert trainable(full_fine_tuning(model, embeddings=True)) == total
    assert trainable(linear_probe(model)) == 6 * model.config.n_embd  # the score head has no bias


def test_shipped_grids_are_package_data():
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["minipeft"]
    assert "assets/grids/*" in patterns
    assert experiment.GRID_DIR == ROOT / "minipeft" / "assets" / "grids"
