"""Selective methods: train a chosen part of the existing parameters (chapter 06)."""

from .bitfit import BitFitConfig
from .deltas import DeltaLayer, DenseDelta, SparseDelta
from .diff_pruning import DiffPruningConfig, expected_density, parameter_groups, project_to_budget
from .fishmask import FishMaskConfig, fisher_scores, select_by_fisher
from .ln_tuning import LNTuningConfig
from .partial import PartialConfig

__all__ = [
    "BitFitConfig",
    "DeltaLayer",
    "DenseDelta",
    "DiffPruningConfig",
    "FishMaskConfig",
    "LNTuningConfig",
    "PartialConfig",
    "SparseDelta",
    "expected_density",
    "fisher_scores",
    "parameter_groups",
    "project_to_budget",
    "select_by_fisher",
]
