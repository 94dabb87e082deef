"""Bad input gets a clear error that names what was wrong and what would be right;
nothing half-written is left on disk (ARCHITECTURE.md, "Failure semantics")."""

from __future__ import annotations

import peft
import pytest
import torch

import minipeft as mp
from minipeft.core import io
from minipeft.models import tiny_gpt2, tiny_llama


def test_unknown_target_lists_the_modules_that_exist():
    with pytest.raises(ValueError, match=r"matches no module.*c_attn.*c_fc"):
        mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=["q_proj"]))


def test_regex_must_match_the_full_name():
    with pytest.raises(ValueError, match="matches no module"):
        mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=r"c_att"))


def test_all_linear_skips_the_output_head():
    model = mp.get_peft_model(tiny_llama(), mp.LoraConfig(target_modules="all-linear"))
    wrapped = {n for n, m in model.base_model.model.named_modules() if isinstance(m, mp.core.TunerLayer)}
    assert len(wrapped) == 2 * 7 and "lm_head" not in wrapped


@pytest.mark.parametrize("r", [0, -3])
def test_rank_below_one(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        mp.LoraConfig(r=r)


def test_rank_above_layer_size_warns_and_a_peft_file_of_that_rank_loads(tmp_path):
    """peft accepts r > min(d_out, fan_in) (no gain, more parameters): we warn, and its files load here."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=65, target_modules=["c_attn"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_gpt2(), cfg)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"r=65 exceeds min\(d_out, fan_in\) = min\(192, 64\).*r <= 64"):
        ours = mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="exceeds min"):
        fresh = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=65, target_modules=["c_attn"]))
    assert fresh.get_nb_trainable_parameters()[0] == 2 * 65 * (64 + 192)  # 2 layers, r (d_in + d_out)


@pytest.mark.parametrize("field,value", [("r", "8"), ("lora_alpha", "16"), ("target_modules", 3), ("use_rslora", 1)])
def test_config_field_of_the_wrong_type(field, value):
    with pytest.raises(TypeError, match=f"LoraConfig.{field} must be"):
        mp.LoraConfig(**{field: value})


def test_init_lora_weights_value():
    with pytest.raises(TypeError, match="init_lora_weights"):
        mp.LoraConfig(init_lora_weights="orthogonal")


def test_truncated_adapter_file(tmp_path):
    mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=["c_attn"])).save_pretrained(tmp_path)
    weights = tmp_path / io.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(ValueError, match="not a readable safetensors file.*truncated"):
        mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_pickle_file_is_never_read(tmp_path):
    mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=["c_attn"])).save_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / io.WEIGHTS_NAME)  # a pickle under the safetensors name
    with pytest.raises(ValueError, match="safetensors only"):
        mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        mp.PeftModel.from_pretrained(tiny_gpt2(), "/nonexistent/adapter")


def test_foreign_peft_type(tmp_path):
    mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=["c_attn"])).save_pretrained(tmp_path)
    cfg = tmp_path / io.CONFIG_NAME
    cfg.write_text(cfg.read_text().replace('"LORA"', '"MYSTERY"'))
    with pytest.raises(ValueError, match="peft_type='MYSTERY'"):
        mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_adapter_from_another_architecture(tmp_path):
    mp.get_peft_model(tiny_llama(), mp.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="matches no module"):
        mp.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=["c_attn"]))

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupted_resave_keeps_the_old_adapter(tmp_path, monkeypatch):
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    before = (tmp_path / io.WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(io, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path)
    assert (tmp_path / io.WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([io.WEIGHTS_NAME, io.CONFIG_NAME])


def test_set_unknown_adapter():
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"no adapter named 'other'.*\['default'\]"):
        model.set_adapter("other")


def test_scale_variable():
    from minipeft.data import scale

    with pytest.MonkeyPatch.context() as m:
        m.setenv("MINIPEFT_SCALE", "huge")
        with pytest.raises(ValueError, match="'tiny' or 'full'"):
            scale()
