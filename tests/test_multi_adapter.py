"""Many adapters in one model: load several, switch, delete, and mixed-batch inference
`model(input_ids, adapter_names=[...])`, where each row must equal running it alone with
its adapter ("__base__": the base model), through the generic per-row path (kernel="torch")
and the gathered Triton kernel (kernel="triton", interpreter); HF peft is the outside check."""

from __future__ import annotations

import peft
import pytest
import torch

import minipeft as mp
from minipeft.kernels import multi_lora, set_kernel
from minipeft.models import tiny_gpt2

IDS = torch.randint(3, 200, (5, 9), generator=torch.Generator().manual_seed(4))
ROWS = ["b", "__base__", "a", "c", "b"]
# Three adapters of different ranks and targets; "c" also trains its own copy of the final norm.
SETTINGS = {
    "a": dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
    "b": dict(r=8, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
    "c": dict(r=4, lora_alpha=16, target_modules=["c_fc", "c_proj"], modules_to_save=["ln_f"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter with a non-zero update (random B, a changed norm), saved to its own folder."""
    folder = tmp_path_factory.mktemp("adapters")
    for i, (name, settings) in enumerate(SETTINGS.items()):
        torch.manual_seed(i)
        model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(init_lora_weights=False, **settings))
        if "modules_to_save" in settings:
            with torch.no_grad():
                model.base_model.model.transformer.ln_f.modules_to_save["default"].weight.mul_(1.5)
        model.save_pretrained(folder / name)
    return folder


def load_all(folder, kernel: str = "auto") -> mp.PeftModel:
    model = mp.PeftModel.from_pretrained(tiny_gpt2(), folder / "a", adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(folder / name, name)
    set_kernel(model, kernel)
    return model.eval()


@torch.no_grad()
def row_alone(model: mp.PeftModel, name: str, i: int) -> torch.Tensor:
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids=IDS[i : i + 1]).logits
    model.set_adapter(name)
    return model(input_ids=IDS[i : i + 1]).logits


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_mixed_batch_equals_each_row_alone(saved, kernel, monkeypatch):
    model = load_all(saved, kernel)
    calls = []
    gathered = multi_lora.multi_lora
    monkeypatch.setattr(multi_lora, "multi_lora", lambda *a, **k: calls.append(1) or gathered(*a, **k))
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[i : i + 1], row_alone(model, name, i), rtol=0, atol=1e-5)
    # c_attn, c_fc, attn.c_proj and mlp.c_proj in 2 layers: each has an adapter of the batch.
    assert len(calls) == (8 if kernel == "triton" else 0)
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, mp.core.AdapterWrapper))
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3), "the adapters must differ for the test to mean much"


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_mixed_batch_matches_hf_peft(saved, kernel):
    ours = load_all(saved, kernel)
    ours.delete_adapter("c")  # peft mixes modules_to_save per row only for Linear/Embedding/Conv, not LayerNorm
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), saved / "a", adapter_name="a")
    theirs.load_adapter(saved / "b", adapter_name="b")
    theirs.eval()
    rows = ["b", "__base__", "a", "a", "b"]
    with torch.no_grad():
        expected = theirs(input_ids=IDS, adapter_names=rows).logits
        torch.testing.assert_close(ours(input_ids=IDS, adapter_names=rows).logits, expected, rtol=0, atol=1e-5)


def generate_alone(model: mp.PeftModel, name: str, ids: torch.Tensor, **settings) -> torch.Tensor:
    if name == "__base__":
        with model.disable_adapter():
            return model.generate(input_ids=ids, **settings)
    model.set_adapter(name)
    return model.generate(input_ids=ids, **settings)


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=2, num_return_sequences=2)], ids=["greedy", "beams"])
def test_mixed_batch_generation_equals_each_row_alone_and_hf_peft(saved, settings):
    """generate(adapter_names=...): every row's tokens as if it ran alone with its adapter; with beams, each
    row's copies keep its adapter. HF peft, given the same rows and files, generates the same tokens."""
    ours = load_all(saved)
    ours.delete_adapter("c")
    rows = ["b", "__base__", "a"]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, **settings)
    with torch.no_grad():
        mixed = ours.generate(input_ids=IDS[:3], adapter_names=rows, **settings)
        per_row = mixed.shape[0] // len(rows)
        for i, name in enumerate(rows):
            alone = generate_alone(ours, name, IDS[i : i + 1], **settings)
            assert torch.equal(mixed[i * per_row : (i + 1) * per_row], alone), (name, settings)
        assert not torch.equal(mixed[0:per_row], mixed[2 * per_row : 3 * per_row]), "adapters must lead apart"
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), saved / "a", adapter_name="a")
        theirs.load_adapter(saved / "b", adapter_name="b")
        assert torch.equal(mixed, theirs.eval().generate(input_ids=IDS[:3], adapter_names=rows, **settings))
    assert all(m.row_adapters is None for m in ours.modules() if isinstance(m, mp.core.AdapterWrapper))


def test_load_switch_and_delete_many(saved):
    model = load_all(saved)
    assert sorted(model.peft_config) == ["a", "b", "c"] and model.active_adapter == "a"
    with torch.no_grad():
        mixed = model(input_ids=IDS[:2], adapter_names=["c", "c"]).logits
    torch.testing.assert_close(mixed[1:], row_alone(model, "c", 1), rtol=0, atol=1e-5)
    model.set_adapter("a")
    model.delete_adapter("c")
    assert sorted(model.peft_config) == ["a", "b"] and not any(".c." in k for k in model.state_dict())
    with pytest.raises(ValueError, match=r"no adapters named \['c'\]; this model has \['a', 'b'\]"):
        model(input_ids=IDS[:1], adapter_names=["c"])


def test_refused_with_clear_errors(saved):
    model = load_all(saved)
    with pytest.raises(ValueError, match=r"one adapter name per row of the batch \(5 rows\)"):
        model(input_ids=IDS, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(input_ids=IDS[:1], adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match=r"for inference.*\.eval\(\)"):
        model(input_ids=IDS, adapter_names=ROWS)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="needs unmerged adapters"):
        model(input_ids=IDS, adapter_names=ROWS)
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="kernel must be one of"):
        set_kernel(model, "cuda")
