"""The `full`-scale loading code, exercised offline: a tiny model and a tiny data file
are saved locally and read back through the same functions Colab uses with the hub."""

from __future__ import annotations

import json

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from minipeft.data import docstring_topics, load_instructions, load_text_classification, tokenize_instructions
from minipeft.models import load_classifier, load_testbed, testbed_tokenizer


def test_load_classifier_from_a_local_checkpoint(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=4096, n_positions=64, num_labels=3)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    testbed_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_classifier(num_labels=3, name_or_path=tmp_path)
    enc = tokenizer(["a docstring", "another"], padding=True, return_tensors="pt")
    assert model(**enc).logits.shape == (2, 3)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_load_text_classification_from_local_files(tmp_path):
    rows = {"train": [("good film", 1), ("bad film", 0), ("fine", 1)], "validation": [("awful", 0)]}
    files = {}
    for split, items in rows.items():
        path = tmp_path / f"{split}.jsonl"
        path.write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in items))
        files[split] = str(path)
    data = load_text_classification(data_files=files)
    assert data.train_texts == ["good film", "bad film", "fine"] and data.eval_labels == [0]
    assert data.label_names == ["0", "1"]


def test_docstring_task_is_a_real_split():
    data = docstring_topics()
    assert set(data.train_texts).isdisjoint(data.eval_texts)
    assert len(data.label_names) == 6 and len(data.eval_texts) > 200
    assert set(data.train_labels) == set(range(6)) == set(data.eval_labels)


def test_testbed_is_pretrained_and_classifier_head_is_new():
    lm = load_testbed()
    code = (
        "    def read(self, size=-1):\n"
        "        if size is None:\n"
        "            size = -1\n"
        "        return self._read(size)\n"
    )
    ids = testbed_tokenizer()([code], return_tensors="pt")["input_ids"]
    loss = lm(input_ids=ids, labels=ids).loss
    assert loss < 3.0, "a pretrained model predicts Python far better than chance (ln 4096 = 8.3)"
    (a, _), (b, _) = load_classifier(6, seed=0), load_classifier(6, seed=0)
    assert torch.equal(a.score.weight, b.score.weight), "the head is seeded"
    assert torch.equal(a.transformer.wte.weight, lm.transformer.wte.weight)


def test_load_instructions_from_a_local_alpaca_style_file(tmp_path):
    """Alpaca's columns and single split; one row without an answer is skipped, the rest split by a stable hash."""
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "in words", "output": str(2 * i + 1)}
        for i in range(40)
    ]
    rows.append({"instruction": "Say nothing.", "input": "", "output": "  "})
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_instructions(data_files={"train": str(path)}, eval_fraction=0.25)
    assert len(data.train) + len(data.eval) == 40 and 3 <= len(data.eval) <= 20
    assert {e.instruction for e in data.train}.isdisjoint(e.instruction for e in data.eval)
    assert data.heldout_text == [e.answer for e in data.eval]
    again = load_instructions(data_files={"train": str(path)}, eval_fraction=0.25)
    assert again.eval == data.eval, "the split is stable across runs"
    first = data.train[0]
    assert data.template.prompt(first) == f"{first.instruction}\n{first.input}\n### Response:\n"
    ids, _, labels = tokenize_instructions([first], data.template, testbed_tokenizer(), 48).tensors
    answer = testbed_tokenizer()(first.answer)["input_ids"] + [testbed_tokenizer().eos_token_id]
    assert labels[0][labels[0] != -100].tolist() == answer
