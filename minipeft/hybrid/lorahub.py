"""LoraHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", arXiv:2307.13269): a LoRA adapter for a new task composed from N trained ones, with the
weights found from a few examples of the task and no gradients.

The paper composes each factor with the same weights (a module's update s B A, all ranks equal):

    A = sum_i w_i A_i,    B = sum_i w_i B_i,    update s B A

and searches w in [-1.5, 1.5]^N from w = 0 (the base model) to minimise

    L(w) + alpha * mean_i |w_i|        (alpha = 0.05, the L1 term of the released code)

where L is the loss on the few examples. The paper runs Nevergrad's NGOpt for 40 evaluations, which for
a few continuous bounded variables picks an evolution strategy of the CMA-ES kind; `cma_es` below is a
plain CMA-ES (Hansen, 2016, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) in numpy,
candidates clipped to the box. Only forward passes are needed: each evaluation writes the composed
factors into one working adapter and runs the examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.model import PeftModel
from .merging import check_sources, lora_layers, merged_targets, present, weighted_sum, write_adapter


@dataclass
class LoraHubResult:
    """What the search found; the composed adapter is in the model under `adapter_name`."""

    weights: list[float]  # one per source adapter, in the order given
    loss: float  # the objective at `weights`: task loss + L1 term
    task_loss: float  # the loss on the examples alone
    adapter_name: str
    history: list[float] = field(default_factory=list)  # the best objective after each evaluation


def cma_es(
    f: Callable[[np.ndarray], float], x0: np.ndarray, sigma: float, budget: int, bound: float, seed: int = 0
) -> tuple[np.ndarray, float, list[float]]:
    """Minimise f over [-bound, bound]^n with at most `budget` evaluations (the first at x0), by
    (mu/mu_w, lambda)-CMA-ES with the tutorial's default parameters. Returns (best x, best f, history)."""
    n, rng = len(x0), np.random.default_rng(seed)
    lam = 4 + int(3 * math.log(n))
    mu = lam // 2
    w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    mueff = 1.0 / (w**2).sum()
    cc, cs = (4 + mueff / n) / (n + 4 + 2 * mueff / n), (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))
    mean, cov, pc, ps = np.array(x0, dtype=float), np.eye(n), np.zeros(n), np.zeros(n)
    best_x, best_f = mean.copy(), f(mean)
    history, used, generation = [best_f], 1, 0
    while used < budget:
        values, basis = np.linalg.eigh(cov)
        scale = np.sqrt(np.maximum(values, 1e-20))
        steps = (rng.standard_normal((min(lam, budget - used), n)) * scale) @ basis.T  # y ~ N(0, C)
        xs = np.clip(mean + sigma * steps, -bound, bound)
        fs = []
        for x in xs:
            fs.append(f(x))
            if fs[-1] < best_f:
                best_x, best_f = x.copy(), fs[-1]
            history.append(best_f)
        used += len(xs)
        if len(xs) < mu:
            break
        ys = (xs[np.argsort(fs)[:mu]] - mean) / sigma  # the mu best steps, as taken after clipping
        y_w = w @ ys
        mean = mean + sigma * y_w
        inv_sqrt = basis @ np.diag(1 / scale) @ basis.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * inv_sqrt @ y_w
        generation += 1
        h_sigma = np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * generation)) / chi_n < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + h_sigma * math.sqrt(cc * (2 - cc) * mueff) * y_w
        rank_mu = (ys.T * w) @ ys
        cov = (1 - c1 - cmu) * cov + c1 * (np.outer(pc, pc) + (1 - h_sigma) * cc * (2 - cc) * cov) + cmu * rank_mu
        sigma *= math.exp((cs / damps) * (np.linalg.norm(ps) / chi_n - 1))
    return best_x, best_f, history


def compose(peft_model: PeftModel, adapters: Sequence[str], weights: Sequence[float]) -> dict:
    """{module name: (A, B)} of the LoraHub composition, the scaling s_i folded into A (scaling 1)."""
    out = {}
    for name, layer in lora_layers(peft_model, adapters).items():
        pairs = present(layer, adapters, weights)
        a, b = zip(*(layer.factors(n) for n, _ in pairs), strict=True)
        out[name] = (
            weighted_sum([t.detach() for t in a], torch.tensor([w * layer.scaling[n] for n, w in pairs])),
            weighted_sum([t.detach() for t in b], torch.tensor([w for _, w in pairs])),
        )
    return out


def examples_loss(examples: dict | Sequence[dict]) -> Callable[[PeftModel], float]:
    """The mean of `model(**batch).loss` over the batches (a causal LM's loss with `labels`)."""
    batches = [examples] if isinstance(examples, dict) else list(examples)
    return lambda model: sum(float(model(**batch).loss) for batch in batches) / len(batches)


def lorahub(
    peft_model: PeftModel,
    adapters: list[str],
    examples: dict | Sequence[dict] | None = None,
    loss_fn: Callable[[PeftModel], float] | None = None,
    adapter_name: str = "lorahub",
    budget: int = 40,
    alpha: float = 0.05,
    bound: float = 1.5,
    seed: int = 0,
) -> LoraHubResult:
    """Search the weights of a LoraHub composition of the LoRA `adapters` (equal ranks) on a few examples
    (batches with `labels`, or any `loss_fn(model) -> float` run with the composition active), with at most
    `budget` loss evaluations; the paper's defaults. The best composition is left in the model as the LoRA
    adapter `adapter_name` (it saves and loads as any other); the active adapters and the train/eval mode
    are as before."""
    configs = check_sources(peft_model, adapters, [1.0] * len(adapters), adapter_name)
    if len({c.r for c in configs}) > 1:
        raise ValueError(f"LoraHub composes A and B entry by entry: all adapters need the same r, got "
                         f"{[c.r for c in configs]}")  # fmt: skip
    if (examples is None) == (loss_fn is None):
        raise ValueError("lorahub needs either examples (batches with labels) or loss_fn(model) -> float")
    if not isinstance(budget, int) or budget < 1 or not alpha >= 0 or not bound > 0:
        raise ValueError(f"lorahub needs budget >= 1, alpha >= 0, bound > 0; got {budget}, {alpha}, {bound}")
    loss_fn = loss_fn or examples_loss(examples)
    layers = lora_layers(peft_model, adapters)
    config = merged_targets(peft_model, configs, list(layers), configs[0].r)
    active, training = list(peft_model.active_adapters), peft_model.training
    task_losses: dict[bytes, float] = {}

    def objective(w: np.ndarray) -> float:
        write_adapter(peft_model, adapter_name, config, compose(peft_model, adapters, w.tolist()))
        with torch.no_grad():
            task_losses[w.tobytes()] = float(loss_fn(peft_model))
        return task_losses[w.tobytes()] + alpha * float(np.abs(w).mean())

    write_adapter(peft_model, adapter_name, config, compose(peft_model, adapters, [0.0] * len(adapters)))
    try:
        peft_model.set_adapter(adapter_name)
        peft_model.eval()
        best, loss, history = cma_es(objective, np.zeros(len(adapters)), bound / 3, budget, bound, seed)
    except BaseException:
        peft_model.set_adapter(active)
        peft_model.delete_adapter(adapter_name)
        raise
    finally:
        peft_model.train(training)
    peft_model.set_adapter(active)
    write_adapter(peft_model, adapter_name, config, compose(peft_model, adapters, best.tolist()))
    return LoraHubResult(best.tolist(), loss, task_losses[best.tobytes()], adapter_name, history)
