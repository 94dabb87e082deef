"""The classification loop's evaluation (batched by length) against a plain forward, and the standard-library
walk against a tree written by hand."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2ForSequenceClassification

import minipeft as mp
from minipeft.data import stdlib_files
from minipeft.models import tiny_gpt2
from minipeft.train import evaluate, predict


def classifier_and_data(n: int = 37, width: int = 12):
    """A small GPT-2 classifier (random weights, an untrained head is enough to compare predictions) and a
    right-padded set of examples of random lengths."""
    torch.manual_seed(0)
    config = tiny_gpt2().config.to_dict()
    for key in ("id2label", "label2id"):  # two labels by default; num_labels sets three
        config.pop(key)
    model = GPT2ForSequenceClassification(GPT2Config(**{**config, "num_labels": 3, "pad_token_id": 0}))
    lengths = torch.randint(1, width + 1, (n,))
    mask = (torch.arange(width) < lengths[:, None]).long()  # (N, W)
    ids = torch.randint(1, config["vocab_size"], (n, width)) * mask  # (N, W): pad id 0 after each row
    return model.eval(), TensorDataset(ids, mask, torch.randint(0, 3, (n,)))


def reference(model, dataset: TensorDataset, **kwargs) -> torch.Tensor:
    """Every example alone, unpadded: the definition a batched prediction must equal."""
    out = []
    with torch.no_grad():
        for i, (ids, mask, _) in enumerate(zip(*dataset.tensors, strict=True)):
            n = int(mask.sum())
            route = {k: [v[i]] for k, v in kwargs.items()}
            out.append(model(input_ids=ids[None, :n], attention_mask=mask[None, :n], **route).logits.argmax(-1))
    return torch.cat(out)


def test_predict_and_evaluate_equal_each_example_alone():
    model, data = classifier_and_data()
    model.train()  # predict must evaluate in eval mode and give the mode back
    expected = reference(model.eval(), data)
    model.train()
    got = predict(model, data, batch_size=8)
    assert model.training
    assert torch.equal(got, expected)
    assert evaluate(model, data, batch_size=5) == (expected == data.tensors[2]).sum().item() / len(data)


def test_predict_routes_each_row_to_its_adapter():
    model, data = classifier_and_data()
    peft = mp.get_peft_model(model, mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False), "a")
    peft.add_adapter("b", mp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    routes = ["a" if i % 3 else "b" for i in range(len(data))]
    alone = {}
    for name in ("a", "b"):
        peft.set_adapter(name)
        alone[name] = predict(peft, data)
    assert not torch.equal(alone["a"], alone["b"])  # the adapters differ, so the routing is visible
    expected = torch.stack([alone[r][i] for i, r in enumerate(routes)])
    assert torch.equal(predict(peft, data, batch_size=7, adapter_names=routes), expected)
    assert torch.equal(reference(peft.eval(), data, adapter_names=routes), expected)


def test_predict_refuses_a_route_list_of_the_wrong_length():
    model, data = classifier_and_data()
    with pytest.raises(ValueError, match=r"one name per example \(37\), got 2"):
        predict(model, data, adapter_names=["a", "b"])


def test_stdlib_files_walks_the_library_and_skips_tests_and_installed_packages(tmp_path: Path):
    for rel in ("os.py", "json/__init__.py", "json/tool.py", "json/tests/test_x.py", "test/test_os.py",
                "site-packages/pkg/mod.py", "email/mime/text.py", "email/README.txt", "idlelib/run.py"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    expected = [("email", "email/mime/text.py"), ("json", "json/__init__.py"), ("json", "json/tool.py"),
                ("os", "os.py")]  # fmt: skip
    assert stdlib_files(tmp_path) == [(pkg, tmp_path / rel) for pkg, rel in expected]
