"""AdapterFusion (chapter 08) in the property suite.

Its Case lists no architectures (`kinds=()`), so tests/test_properties.py runs nothing for it: the suite
builds every method with `get_peft_model(bare base, config)`, and a fusion cannot be a model's first
adapter (it fuses adapters the model already holds; get_peft_model refuses it clearly, which
tests/test_hybrid_fusion.py checks on every architecture). tests/test_hybrid_fusion.py runs the suite's
own checks (only the method's parameters train, identity at init, exact disable) on fused models, and
its own save/load round trip and counts (with this closed form) on every architecture.

Closed form: Q, K and V, each (d, d) without bias, at every site of the fused adapters: 3 d^2 per
site; one site per block with Pfeiffer placement, two with Houlsby's.
"""

from __future__ import annotations

from minipeft.hybrid.fusion import FusionConfig
from tests.cases import Case
from tests.cases_additive import dims

FUSED = ["a", "b", "c"]  # the serial adapters tests/test_hybrid_fusion.py trains first and fuses


def fusion_count(base, sites_per_block: int = 1) -> int:
    g = dims(base)
    return sites_per_block * g["L"] * 3 * g["d"] ** 2


CASES = {
    "ADAPTER_FUSION": Case(
        config=lambda kind, identity: FusionConfig(adapter_names=FUSED),
        closed_form=lambda base, names, cfg: fusion_count(base),
        mergeable=False,  # softmax attention over nonlinear adapters: no weight update to fold in
        kinds=(),
    ),
}
