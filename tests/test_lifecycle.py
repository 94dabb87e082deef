"""Adapter lifecycle as in HF peft, and failure semantics (ARCHITECTURE.md, "Failure semantics"):
set/delete/merge/disable/unload on models with several adapters, refusals that leave the model and
the files exactly as they were, and a corrected retry that works."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch

import minipeft as mp
from minipeft.models import tiny_bert, tiny_gpt2

IDS = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))


def lora(seed: int, **kw) -> mp.LoraConfig:
    torch.manual_seed(seed)
    return mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False, **kw)


def two_adapters() -> mp.PeftModel:
    model = mp.get_peft_model(tiny_gpt2(), lora(0), "a")
    torch.manual_seed(1)
    model.add_adapter("b", lora(1))
    return model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


def snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    """Every module's type and every tensor's value: what 'the model is exactly as before' compares."""
    return {n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, before: tuple[dict, dict]) -> None:
    types, state = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert set(after) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)


def test_set_adapter_on_a_merged_model_unmerges_first():
    model = two_adapters()
    model.set_adapter("b")
    only_b = logits(model)
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("b")
    torch.testing.assert_close(logits(model), only_b, rtol=0, atol=1e-5)


def test_disable_adapter_works_while_merged_and_nests():
    model = two_adapters()
    base = logits(mp.models.tiny_gpt2())
    adapted = logits(model)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"), model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)
        with model.disable_adapter():
            pass
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)  # the inner exit kept the outer state
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"), model.disable_adapter():
        raise RuntimeError("inside")
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)  # restored after an exception too


def test_second_get_peft_model_on_the_same_base_is_refused():
    base = tiny_gpt2()
    first = mp.get_peft_model(base, lora(0))
    before = snapshot(first)
    with pytest.raises(ValueError, match="already carries adapters.*add_adapter"):
        mp.get_peft_model(base, lora(1))
    assert_same(first, before)
    assert first.active_adapters == ["default"]


def test_merging_twice_warns_and_adds_nothing():
    model = two_adapters()
    expected = logits(model)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def test_delete_the_active_or_a_merged_adapter():
    model = two_adapters()
    model.set_adapter("b")
    only_b = logits(model)
    model.set_adapter(["a", "b"])
    model.merge_adapter()
    with pytest.warns(UserWarning, match="now active: \\['b'\\]"):
        model.delete_adapter("a")  # merged and active: unmerged first, "b" stays merged and active
    assert model.active_adapters == ["b"] and list(model.peft_config) == ["b"]
    torch.testing.assert_close(logits(model), only_b, rtol=0, atol=1e-5)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert "a" not in layer.lora_A and "a" not in layer.scaling and "a" not in layer.kernel
    with pytest.raises(ValueError, match="only adapter; unload\\(\\)"):
        model.delete_adapter("b")


def test_unload_and_merge_and_unload_then_saving_is_refused(tmp_path):
    model = two_adapters()
    model.save_pretrained(tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    merged_logits = logits(model)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, mp.core.AdapterWrapper) for m in plain.modules())
    torch.testing.assert_close(logits(plain), merged_logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unloaded.*overwrite a good adapter"):
        model.save_pretrained(tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    other = two_adapters()
    other.merge_adapter()
    plain = other.unload()  # unmerged, wrappers gone: the base model again
    torch.testing.assert_close(logits(plain), logits(tiny_gpt2()), rtol=0, atol=1e-5)


def test_safe_merge_refuses_a_non_finite_update_and_writes_nothing():
    model = two_adapters()
    with torch.no_grad():
        model.base_model.model.transformer.h[1].attn.c_attn.lora_B["a"].weight[0, 0] = math.nan
    before = snapshot(model)
    with pytest.raises(ValueError, match="safe_merge: adapter 'a' has a non-finite update"):
        model.merge_adapter(safe_merge=True)
    assert_same(model, before)
    assert model._merged() == []


def test_loading_for_inference_gives_an_eval_model_with_nothing_trainable(tmp_path):
    two_adapters().save_pretrained(tmp_path)
    loaded = mp.PeftModel.from_pretrained(tiny_gpt2().train(), tmp_path / "a", adapter_name="a")
    assert not loaded.training and loaded.get_nb_trainable_parameters()[0] == 0
    trainable = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a", adapter_name="a", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 2 * (64 + 192)


def test_a_failed_load_leaves_the_model_as_it_was_and_a_corrected_retry_works(tmp_path):
    two_adapters().save_pretrained(tmp_path)
    wide = mp.get_peft_model(tiny_gpt2(n_embd=96), lora(2))
    wide.save_pretrained(tmp_path / "wide")
    base = tiny_gpt2()
    before = snapshot(base)
    with pytest.raises(ValueError, match="shape"):
        mp.PeftModel.from_pretrained(base, tmp_path / "wide")
    assert_same(base, before)  # no wrapper left behind, no weight touched
    model = mp.PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")  # the retry on the same base
    before = snapshot(model)
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(tmp_path / "wide", "w")
    assert_same(model, before)
    assert list(model.peft_config) == ["a"]
    model.load_adapter(tmp_path / "b", "w")
    model.set_adapter("w")
    reference = two_adapters()
    reference.set_adapter("b")
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["", "a.b", "../up", "/abs", "sub/dir", "__base__", " padded", 3])
def test_adapter_names_that_would_break_keys_or_folders_are_refused(name):
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter name .* is not allowed"):
        model.add_adapter(name, lora(3))
    assert_same(model, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mp.LoraConfig(lora_alpha=math.nan),
        lambda: mp.LoraConfig(lora_alpha=math.inf),
        lambda: mp.VeraConfig(d_initial=math.nan),
        lambda: mp.DiffPruningConfig(l0_lambda=-math.inf),
        lambda: mp.ParallelAdapterConfig(scaling=math.nan),
    ],
)
def test_non_finite_config_numbers_are_refused_with_the_field_name(make):
    with pytest.raises(ValueError, match=r"\.\w+ must be a finite number"):
        make()


def test_all_linear_never_targets_modules_to_save(tmp_path):
    base = tiny_bert()
    head = torch.nn.Linear(64, 3)
    base.classifier = head
    config = mp.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    model = mp.get_peft_model(base, config)
    assert type(model.base_model.model.classifier).__name__ == "ModulesToSaveWrapper"
    assert not any(n.startswith("classifier.") and "lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)  # a trained head
    model.save_pretrained(tmp_path)
    reference = tiny_bert()
    reference.classifier = copy.deepcopy(head)
    theirs = peft.PeftModel.from_pretrained(reference, tmp_path)
    assert not [n for n in theirs.state_dict() if "classifier" in n and "lora" in n]
    saved_head = theirs.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(saved_head, head.weight + 1.0)


@pytest.mark.parametrize("fail_at", ["write config", "write weights", "rename weights", "rename config"])
def test_a_save_cut_short_at_any_step_leaves_a_consistent_loadable_folder(tmp_path, monkeypatch, fail_at):
    """An injected failure at each step of save_pretrained: the folder still loads, as the old pair
    (weights matching their own config), and the next save works."""
    old = two_adapters()
    old.save_pretrained(tmp_path)
    old.set_adapter("a")
    expected = logits(old)
    new = mp.get_peft_model(tiny_gpt2(), lora(7, lora_alpha=32))  # another config and other weights; "default"
    # is saved at the top of the folder it is given: here, over adapter "a"
    io, calls = mp.core.io, {"replace": 0, "write": 0}
    real_replace, real_save, real_write = io.os.replace, io.save_file, type(tmp_path).write_text

    def replace(src, dst):
        calls["replace"] += 1
        if (fail_at, calls["replace"]) in {("rename weights", 1), ("rename config", 2)}:
            raise OSError("injected: rename failed")
        return real_replace(src, dst)

    def save_file(*args, **kw):
        if fail_at == "write weights":
            raise OSError("injected: disk full")
        return real_save(*args, **kw)

    def write_text(self, *args, **kw):
        if fail_at == "write config" and self.name.startswith(".adapter_config"):
            raise OSError("injected: disk full")
        return real_write(self, *args, **kw)

    monkeypatch.setattr(io.os, "replace", replace)
    monkeypatch.setattr(io, "save_file", save_file)
    monkeypatch.setattr(type(tmp_path), "write_text", write_text)
    with pytest.raises(OSError, match="injected"):
        new.save_pretrained(tmp_path / "a")
    monkeypatch.undo()
    assert not [p.name for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")], "temporary files left"
    loaded = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a", adapter_name="a")
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    new.save_pretrained(tmp_path / "a")  # a later save works and wins
    reloaded = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a", adapter_name="a")
    torch.testing.assert_close(logits(reloaded), logits(new), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert logits(reloaded).ne(expected).any()


def test_a_config_edited_by_hand_still_loads_with_a_warning(tmp_path):
    model = mp.get_peft_model(tiny_gpt2(), lora(0))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"base_model_name_or_path": null', '"base_model_name_or_path": "mine"'))
    with pytest.warns(UserWarning, match="changed after adapter_model.safetensors was saved"):
        loaded = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_ia3_unmerge_is_exact_even_with_a_zero_in_the_vector():
    model = mp.get_peft_model(tiny_gpt2(), mp.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                        feedforward_modules=["mlp.c_proj"], init_ia3_weights=False))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.ia3_l["default"][3] = 0.0  # a feature switched off entirely
    before = snapshot(tiny_gpt2())
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert_same(model.unload(), before)  # bit-exact base weights again, no NaN
