"""Offline tasks for the `tiny` scale, and loaders for real data sets at `full` scale.

The `tiny` task: classify a Python standard-library docstring by the package it comes
from (asyncio, email, logging, tkinter, unittest, xml). The text is real English written
by people, present on every machine, and the testbed model never saw these packages in
pretraining (scripts/pretrain_testbed.py holds them out). Used from chapter 01 on.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

# The six packages of the docstring task; also held out of the testbed's pretraining corpus.
TOPICS = ("asyncio", "email", "logging", "tkinter", "unittest", "xml")
# Folders of the standard library that are not library text (tests, IDLE, installed packages).
SKIPPED = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__")


@dataclass
class TextClassificationData:
    """A real train/eval split: texts, integer labels and the label names."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_names: list[str]


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(top-level package, path) for every library .py file, sorted for determinism."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIPPED for p in parts):
            continue
        out.append((parts[0].removesuffix(".py"), path))
    return out


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def docstring_topics(
    max_per_class: int = 250, eval_fraction: float = 0.25, min_chars: int = 24
) -> TextClassificationData:
    """The docstring-to-package task. The split is by a hash of the text, so it is stable
    across runs and machines, and duplicate docstrings never straddle train and eval."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    per_class: dict[str, set[str]] = {t: set() for t in TOPICS}
    for package, path in stdlib_files():
        if package not in per_class:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(_first_paragraph(doc)) >= min_chars:
                    per_class[package].add(_first_paragraph(doc))
    data = TextClassificationData([], [], [], [], list(TOPICS))
    for label, topic in enumerate(TOPICS):
        texts = sorted(per_class[topic], key=lambda t: hashlib.sha1(t.encode()).hexdigest())[:max_per_class]
        n_eval = round(len(texts) * eval_fraction)
        data.eval_texts += texts[:n_eval]
        data.eval_labels += [label] * n_eval
        data.train_texts += texts[n_eval:]
        data.train_labels += [label] * (len(texts) - n_eval)
    return data


def load_text_classification(
    name: str = "glue/sst2", data_files: dict[str, str] | None = None
) -> TextClassificationData:
    """`full` scale: a hub data set (default GLUE SST-2), or local json/csv files with
    `sentence` and `label` columns (how the tests exercise this same code offline)."""
    from datasets import load_dataset  # optional dependency: pip install minipeft[full]

    if data_files is not None:
        suffix = Path(next(iter(data_files.values()))).suffix.lstrip(".")
        ds = load_dataset({"jsonl": "json"}.get(suffix, suffix), data_files=data_files)
    else:
        ds = load_dataset(*name.split("/"))
    train, evaluation = ds["train"], ds["validation"]
    names = train.features["label"].names if hasattr(train.features["label"], "names") else None
    labels = sorted(set(train["label"]))
    return TextClassificationData(
        list(train["sentence"]),
        list(train["label"]),
        list(evaluation["sentence"]),
        list(evaluation["label"]),
        names or [str(x) for x in labels],
    )


def tokenize(texts: list[str], labels: list[int], tokenizer, max_length: int) -> TensorDataset:
    """Pad/truncate once up front; the training loop then only indexes tensors."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))  # (N, T), (N, T), (N,)


def scale() -> str:
    """The scale every chapter honours: MINIPEFT_SCALE=tiny (default) or full."""
    value = os.environ.get("MINIPEFT_SCALE", "tiny")
    if value not in ("tiny", "full"):
        raise ValueError(f"MINIPEFT_SCALE must be 'tiny' or 'full', got {value!r}")
    return value


def load_task() -> TextClassificationData:
    """The chapters' task at the current scale: docstring topics (tiny) or GLUE SST-2 (full)."""
    return docstring_topics() if scale() == "tiny" else load_text_classification()
