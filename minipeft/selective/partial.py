"""Partial fine-tuning: train the last k transformer blocks in full, freeze the rest.

The baseline the PEFT surveys compare against (e.g. Lialin et al., 2023, arXiv:2303.15647):
the top of a pretrained network is the most task-specific part, so training only it is the
simplest structured selection. With k = 0 and `modules_to_save=["score"]` it is the linear probe.
Taught in chapter 06.

Every module with parameters inside the last k blocks (optionally only those named by
`target_modules`) gets a dense delta per parameter, so the trained update is stored, merged and
switched off like any other adapter. The count is the closed form: all parameters of those blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import Method, PeftConfig, register
from ..core.layers import innermost
from ..core.targets import find_targets
from .deltas import DeltaLayer, outer_modules


@dataclass
class PartialConfig(PeftConfig):
    peft_type = "PARTIAL"
    # How many of the last blocks train in full; 0 trains none (then only modules_to_save train).
    num_last_blocks: int = 1
    # Name of the nn.ModuleList of blocks (transformer.h, model.layers, encoder.layer); None finds it.
    blocks: str | None = None
    # True: the deltas start at zero (the base model); False: random (tests need a non-zero update).
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_last_blocks < 0:
            raise ValueError(f"PartialConfig.num_last_blocks must be >= 0, got {self.num_last_blocks}")
        if self.num_last_blocks == 0 and not self.modules_to_save:
            raise ValueError("PartialConfig with num_last_blocks=0 trains nothing; give modules_to_save (the head)")


def find_blocks(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the named one, or the ModuleList holding most parameters."""
    lists = {n: m for n, m in outer_modules(model).items() if isinstance(m, nn.ModuleList) and len(m) > 0}
    if name is None and lists:
        name = max(lists, key=lambda n: sum(p.numel() for p in lists[n].parameters()))
    if name not in lists:
        raise ValueError(f"no list of blocks named {name!r} in {type(model).__name__}; lists found: {sorted(lists)}")
    return name, lists[name]


class PartialMethod(Method):
    def targets(self, model: nn.Module, config: PartialConfig) -> list[str]:
        """Every module with parameters of its own inside the last k blocks (and in `target_modules`, if given)."""
        name, blocks = find_blocks(model, config.blocks)
        k = config.num_last_blocks
        if k > len(blocks):
            raise ValueError(
                f"num_last_blocks={k} but {type(model).__name__} has {len(blocks)} blocks in {name!r}; "
                f"use 0 <= num_last_blocks <= {len(blocks)}"
            )
        chosen = tuple(f"{name}.{i}." for i in range(len(blocks) - k, len(blocks)))
        allowed = None if config.target_modules is None else set(find_targets(model, config.target_modules))
        names = [
            n
            for n, m in outer_modules(model, config.modules_to_save).items()
            if n.startswith(chosen)
            and any(True for _ in innermost(m).parameters(recurse=False))
            and (allowed is None or n in allowed)
        ]
        if k and not names:
            raise ValueError(f"target_modules={config.target_modules!r} matches nothing inside the last {k} blocks")
        return names


# Every parameter of those modules gets a dense delta: DeltaLayer's default.
PARTIAL = register(PartialMethod(PartialConfig, DeltaLayer))
