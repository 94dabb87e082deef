"""Property-suite entries for the layer types beyond nn.Linear (core/layer_types.py): every method on
the tiny plain-torch net of tests/test_layer_types.py (an nn.Embedding, an nn.Conv1d, an nn.Conv2d and
an nn.Linear), targeting every layer type HF peft adapts with it: the model kind "conv"."""

from __future__ import annotations

from tests.cases import Case
from tests.test_layer_types import SUPPORTED, TinyConvNet, closed_form, config

# The property suite's extra model kind (test_properties.py adds it to the architectures of tests/cases.py;
# the other test files loop over those architectures only).
MODELS_LAYER_TYPES = {"conv": TinyConvNet}


def case(method: str) -> Case:
    """`method` (a key of SUPPORTED) on all the layers peft adapts with it, at once."""
    return Case(
        config=lambda kind, identity: config(method, list(SUPPORTED[method]), identity),
        closed_form=lambda base, names, cfg: closed_form(method, base, cfg),
        kinds=("conv",),
    )


CASES: dict[str, Case] = {
    "LORA/layer_types": case("lora"),
    "LORA/dora_layer_types": case("dora"),
    "LOHA/layer_types": case("loha"),
    "LOKR/layer_types": case("lokr"),
    "LOKR/full_layer_types": case("lokr_full"),
    "LOHA/cp_layer_types": case("loha_cp"),
    "LOKR/cp_layer_types": case("lokr_cp"),
    "IA3/layer_types": case("ia3"),
    "IA3/feedforward_layer_types": case("ia3_ff"),
}
