"""ARCHITECTURE.md, "Properties": what every method must show, run over every
registered method on tiny GPT-2 (Conv1D), LLaMA-style and BERT-style models."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft as mp
from minipeft.core import REGISTRY, find_targets
from tests.cases import CASES, MODELS, outputs
from tests.cases_layer_types import MODELS_LAYER_TYPES

# The architectures, and the tiny net holding every layer type peft adapts (tests/cases_layer_types.py).
MODELS = {**MODELS, **MODELS_LAYER_TYPES}

METHODS = sorted(CASES)
KINDS = sorted(MODELS)
# (method, architecture) pairs: every method on every architecture it applies to (Case.kinds).
PAIRS = [(m, k) for m in METHODS for k in KINDS if k in CASES[m].kinds]
# A base of another width: loading the adapter into it must fail clearly.
WIDER = {"gpt2": dict(n_embd=96), "llama": dict(hidden_size=96), "bert": dict(hidden_size=96), "conv": dict(width=16)}
IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def test_every_method_has_a_case():
    # A key "METHOD/variant" (e.g. "LORA/dora") runs the suite on a variant of a registered method.
    assert sorted(REGISTRY) == [m for m in METHODS if "/" not in m], (
        "register a Case in tests/cases.py for every method"
    )
    assert all(m.split("/")[0] in REGISTRY for m in METHODS), "a variant's key must start with a registered method"


def build(method: str, kind: str, identity: bool):
    base = MODELS[kind]()
    reference = copy.deepcopy(base)
    config = CASES[method].config(kind, identity)
    # Methods that wrap no layers (prompts) have no target_modules.
    targets = find_targets(base, config.target_modules) if config.target_modules is not None else []
    return reference, mp.get_peft_model(base, config), targets


@pytest.mark.parametrize("method,kind", PAIRS)
def test_only_adapter_parameters_train(method, kind):
    reference, model, _ = build(method, kind, identity=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_keys = {k for k, p in model.named_parameters() if p.requires_grad}
    assert adapter_keys, "the method must have trainable parameters"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = outputs(model, IDS).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key, value in before.items():
        if key in adapter_keys:
            continue
        assert torch.equal(value, after[key]), f"{key} changed but is not an adapter parameter"
    assert any(not torch.equal(before[k], after[k]) for k in adapter_keys), "no adapter parameter moved"


@pytest.mark.parametrize("method,kind", [(m, k) for m, k in PAIRS if CASES[m].identity_at_init])
def test_identity_at_init(method, kind):
    reference, model, _ = build(method, kind, identity=True)
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,kind", [(m, k) for m, k in PAIRS if CASES[m].keeps_base])
def test_disable_adapter_gives_base_output_exactly(method, kind):
    reference, model, _ = build(method, kind, identity=False)
    adapted = outputs(model, IDS)
    base = outputs(reference, IDS)  # prompt methods return n more positions: different shape, non-trivial
    assert adapted.shape != base.shape or not torch.allclose(adapted, base), "test needs a non-trivial adapter"
    with model.disable_adapter():
        assert torch.equal(outputs(model, IDS), outputs(reference, IDS))
    assert torch.equal(outputs(model, IDS), adapted), "state not restored after disable_adapter()"


@pytest.mark.parametrize("method,kind", [(m, k) for m, k in PAIRS if CASES[m].mergeable])
def test_merge_equivalence(method, kind):
    _, model, _ = build(method, kind, identity=False)
    unmerged = outputs(model, IDS)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, IDS), unmerged, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()  # peft's behaviour: a warning, and the update is not added twice
    torch.testing.assert_close(outputs(model, IDS), unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(outputs(model, IDS), unmerged, rtol=0, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, mp.core.AdapterWrapper) for m in plain.modules())
    torch.testing.assert_close(outputs(plain, IDS), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,kind", PAIRS)
def test_save_load_round_trip(method, kind, tmp_path):
    _, model, _ = build(method, kind, identity=False)
    expected = outputs(model, IDS)
    model.save_pretrained(tmp_path)
    saved = mp.core.io.load_adapter_files(tmp_path)[1]
    # The adapter's tensors, in the form its method's files take (peft's: a prompt as one table, LN tuning as
    # the trained norms); for the other methods exactly the adapter's parameters.
    form = REGISTRY[model.peft_config["default"].peft_type].to_file
    on_file = form(model.base_model.model, "default", model.adapter_state_dict())
    assert set(saved) == set(on_file), "the file must hold the adapter and nothing else"
    own_form = on_file.keys() == model.adapter_state_dict().keys()
    base_keys = {"base_model.model." + k for k in MODELS[kind]().state_dict()}
    assert not set(saved) & base_keys, "base model weights leaked into the adapter file"
    loaded = mp.PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    # bit-exact, but for a norm stored as base + delta and read back as a delta (one rounding)
    torch.testing.assert_close(outputs(loaded, IDS), expected, rtol=0, atol=0 if own_form else 1e-6)
    assert loaded.get_nb_trainable_parameters()[0] == 0, "loaded for inference: nothing trains"
    with pytest.raises(ValueError, match="shape"):
        mp.PeftModel.from_pretrained(MODELS[kind](**WIDER[kind]), tmp_path)


@pytest.mark.parametrize("method,kind", PAIRS)
def test_parameter_count_matches_closed_form(method, kind):
    _, model, targets = build(method, kind, identity=True)
    base = MODELS[kind]()
    trainable, total = model.get_nb_trainable_parameters()
    expected = CASES[method].closed_form(base, targets, model.peft_config["default"])
    assert trainable == expected
    assert total == sum(p.numel() for p in base.parameters()) + expected
