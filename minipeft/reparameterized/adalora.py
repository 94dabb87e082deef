"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023,
arXiv:2303.10512). Taught in chapter 07.

LoRA gives every matrix the same rank. AdaLoRA starts each one at `init_r` and moves a global
budget of singular values to where they matter. The update has an SVD-like form

    Delta W = s * P diag(lambda) Q,   P: (d_out, r) `lora_B`,  lambda: (r, 1) `lora_E`,  Q: (r, d_in) `lora_A`

with P and Q pushed towards orthogonality by a regulariser, so that zeroing one lambda removes
one direction without disturbing the others. During training (`RankAllocator`, called by the
training loop after every optimizer step):

1. importance of each weight: the sensitivity |w * dL/dw|, smoothed (EMA, beta1) and multiplied
   by its uncertainty (EMA of its deviation, beta2); a triplet (P_i, lambda_i, Q_i) scores
   s(lambda_i) + mean s(P_:,i) + mean s(Q_i,:);
2. the budget (total number of kept triplets) falls from init_r to target_r per matrix on a cubic
   schedule between `tinit` and `total_step - tfinal`;
3. every `deltaT` steps the lambdas of all but the top-budget triplets are set to zero.

The rank each layer ends with is `RankAllocator.ranks()`, its number of non-zero lambdas.
Names follow HF peft (`lora_A`, `lora_E`, `lora_B`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import Method, PeftConfig, register, require
from ..core.layers import TunerLayer, check_rank
from ..core.targets import LINEAR_TYPES
from .lora import LORA


@dataclass
class AdaLoraConfig(PeftConfig):
    peft_type = "ADALORA"
    # Starting rank of every adapted matrix (the budget starts at init_r per matrix). peft's default.
    init_r: int = 12
    # Average rank per matrix at the end: the final budget is target_r x number of matrices.
    target_r: int = 8
    # Scaling s = lora_alpha / init_r, as LoRA's alpha / r.
    lora_alpha: float = 8
    # Dropout on the adapter's input; 0 = off.
    lora_dropout: float = 0.0
    # Optimizer steps of the whole run; the budget schedule needs it (required, as in peft).
    total_step: int | None = None
    # Warm-up steps at the full budget before pruning starts (importance estimates settle first).
    tinit: int = 0
    # Last steps trained at the final budget with a frozen rank pattern.
    tfinal: int = 0
    # Steps between two budget allocations.
    deltaT: int = 1
    # EMA factors of the sensitivity (beta1) and of its uncertainty (beta2), the paper's 0.85.
    beta1: float = 0.85
    beta2: float = 0.85
    # Weight of the orthogonality regulariser ||P^T P - I||^2 + ||Q Q^T - I||^2 (peft's default).
    orth_reg_weight: float = 0.5
    # True: lambda = 0 (identity at init), P and Q ~ N(0, 0.02). False: lambda random too (tests).
    init_lora_weights: bool = True
    # Written for peft: GPT-2's Conv1D stores weights as (in, out). minipeft detects it per layer.
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_r < 1 or self.init_r < self.target_r:
            raise ValueError(
                f"AdaLoraConfig needs 1 <= target_r <= init_r (the budget only shrinks), got target_r="
                f"{self.target_r} > init_r={self.init_r}; raise init_r or lower target_r"
            )
        for beta in ("beta1", "beta2"):  # EMA factors: 1 would never update, above 1 diverges
            require(self, beta, 0.0 <= getattr(self, beta) < 1.0, "in [0, 1) (the paper's 0.85)")
        require(self, "deltaT", self.deltaT >= 1, "a number of steps >= 1")
        require(self, "tinit", self.tinit >= 0, "a number of steps >= 0")
        require(self, "tfinal", self.tfinal >= 0, "a number of steps >= 0")
        require(self, "orth_reg_weight", self.orth_reg_weight >= 0, ">= 0 (a penalty weight)")
        require(self, "lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)")
        if self.total_step is None or self.total_step <= self.tinit + self.tfinal:
            raise ValueError(
                f"AdaLoraConfig.total_step must be set and exceed tinit + tfinal = {self.tinit + self.tfinal} "
                f"(the cubic schedule runs in between), got total_step={self.total_step}"
            )


class AdaLoraLayer(TunerLayer):
    """One base linear with named AdaLoRA adapters in SVD form."""

    adapter_layer_names = ("lora_A", "lora_E", "lora_B", "lora_dropout")
    base_types = LINEAR_TYPES

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A, self.lora_E, self.lora_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: AdaLoraConfig) -> None:
        r = config.init_r
        check_rank(self, r, "AdaLoRA init")
        kwargs = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A[name] = nn.Parameter(torch.randn(r, self.in_features, **kwargs) * 0.02)  # Q
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, **kwargs) * 0.02)  # P
        self.lora_E[name] = nn.Parameter(
            torch.zeros(r, 1, **kwargs) if config.init_lora_weights else torch.randn(r, 1, **kwargs)
        )
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = config.lora_alpha / r

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self.scaling[name]  # (d_out, d_in)

    def apply_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.dtype))  # (..., d_in)
        update = (x @ (a * e).T) @ b.T * self.scaling[name]  # (..., r) -> (..., d_out)
        return result + update.to(result.dtype)


def adalora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, AdaLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_E}


class RankAllocator:
    """The training-loop side of AdaLoRA: `regularizer()` joins the loss, `update_and_allocate(step)`
    runs after each optimizer step (while the gradients are still there)."""

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        self.model, self.config = model, model.peft_config[adapter_name]
        self.layers = list(adalora_layers(model, adapter_name).values())
        self.name = adapter_name
        self.initial_budget = self.config.init_r * len(self.layers)  # b(0)
        self.target_budget = self.config.target_r * len(self.layers)  # b(T)
        self.smoothed: dict[nn.Parameter, torch.Tensor] = {}  # I-bar, EMA of the sensitivity
        self.uncertainty: dict[nn.Parameter, torch.Tensor] = {}  # U-bar
        self.final_mask: list[torch.Tensor] | None = None  # frozen pattern for the last tfinal steps

    def ranks(self) -> dict[str, int]:
        """The rank each adapted matrix has now (after training: its final rank)."""
        return {n: int((m.lora_E[self.name] != 0).sum()) for n, m in adalora_layers(self.model, self.name).items()}

    def regularizer(self) -> torch.Tensor:
        """orth_reg_weight * mean over matrices of ||P^T P - I||^2_F + ||Q Q^T - I||^2_F."""
        total = 0.0
        for layer in self.layers:
            a, b = layer.lora_A[self.name], layer.lora_B[self.name]  # (r, d_in), (d_out, r)
            eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
            total = total + (a @ a.T - eye).pow(2).sum() + (b.T @ b - eye).pow(2).sum()
        return self.config.orth_reg_weight * total / len(self.layers)

    def budget(self, step: int) -> int:
        """b(t): init budget until tinit, cubic decay to the target budget, then constant."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.initial_budget
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget
        left = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tinit - cfg.tfinal)
        return int(self.target_budget + (self.initial_budget - self.target_budget) * left**3)

    def score(self, param: nn.Parameter) -> torch.Tensor:
        """Update I-bar and U-bar of one parameter from its gradient; return s = I-bar * U-bar."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        sensitivity = (param * param.grad).abs()  # I(w) = |w dL/dw|, same shape as param
        smooth = self.smoothed.get(param, torch.zeros_like(param))
        smooth = beta1 * smooth + (1 - beta1) * sensitivity
        unc = beta2 * self.uncertainty.get(param, torch.zeros_like(param)) + (1 - beta2) * (sensitivity - smooth).abs()
        self.smoothed[param], self.uncertainty[param] = smooth, unc
        return smooth * unc

    @torch.no_grad()
    def update_and_allocate(self, step: int) -> int:
        """Score every triplet, keep the top b(step) globally, zero the other lambdas. Returns b(step)."""
        cfg, name = self.config, self.name
        lambdas = [layer.lora_E[name] for layer in self.layers]  # each (r, 1)
        budget = self.budget(step)
        if self.final_mask is None and all(p.grad is not None for p in lambdas):
            triplets = [
                self.score(e).squeeze(1)  # (r,)
                + self.score(layer.lora_A[name]).mean(1)  # (r,): mean over the row Q_i of length d_in
                + self.score(layer.lora_B[name]).mean(0)  # (r,): mean over the column P_i of length d_out
                for layer, e in zip(self.layers, lambdas, strict=True)
            ]
            if step > cfg.tinit and step % cfg.deltaT == 0 or step > cfg.total_step - cfg.tfinal:
                flat = torch.cat(triplets)  # (sum of r,)
                threshold = flat.kthvalue(flat.numel() - budget).values if budget < flat.numel() else -1.0
                masks = [t > threshold for t in triplets]
                for e, keep in zip(lambdas, masks, strict=True):
                    e.masked_fill_(~keep[:, None], 0.0)
                if step > cfg.total_step - cfg.tfinal:
                    self.final_mask = masks
        elif self.final_mask is not None:  # rank pattern frozen: keep the pruned lambdas at zero
            for e, keep in zip(lambdas, self.final_mask, strict=True):
                e.masked_fill_(~keep[:, None], 0.0)
        return budget


ADALORA = register(Method(AdaLoraConfig, AdaLoraLayer, default_roles=LORA.default_roles))
