"""Offline tasks for the `tiny` scale, and loaders for real data sets at `full` scale.

The `tiny` task: classify a Python standard-library docstring by the package it comes
from (asyncio, email, logging, tkinter, unittest, xml). The text is real English written
by people, present on every machine, and the testbed model never saw these packages in
pretraining (scripts/pretrain_testbed.py holds them out). Used from chapter 01 on.

Chapter 13's instruction pairs come from the same library (docstring -> function name, signature -> first
docstring sentence), split by package with those six held out; at `full` scale, Stanford Alpaca.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import string
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
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED]  # pruned, not walked: site-packages alone is large
        paths += [Path(folder, f) for f in files if f.endswith(".py")]
    return [(p.relative_to(root).parts[0].removesuffix(".py"), p) for p in sorted(paths)]


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


# -- instruction tuning (chapter 13) -------------------------------------------------------------------------

# The instructions of the two kinds of pairs, kept short: the testbed's context is 64 tokens.
INSTRUCTIONS = {
    "name": "Name the function",  # first docstring sentence -> the function's name
    "summary": "Describe",  # signature -> first docstring sentence
}


@dataclass(frozen=True)
class Example:
    """One instruction pair: what to do, on what, and the answer a model should give."""

    instruction: str
    input: str
    answer: str
    # Where it comes from: the stdlib package (tiny) or the data set's name (full); the split is by package.
    source: str = ""

    def __post_init__(self) -> None:
        if not self.answer.strip():
            raise ValueError(
                f"Example.answer must be non-empty text, got {self.answer!r} (instruction {self.instruction!r}, "
                f"input {self.input[:40]!r}): a pair without an answer teaches nothing"
            )


@dataclass(frozen=True)
class PromptTemplate:
    """How an example becomes text: `text.format(instruction=..., input=..., answer=...)`. The answer field
    must close the template: the prompt is everything before it, and the loss covers only the answer."""

    # "{instruction}: {input}" then a newline and the answer: few tokens, and the newline tells the model
    # the prompt has ended (the answer then starts at a token boundary, as in generation).
    text: str = "{instruction}: {input}\n{answer}"

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        unknown = set(fields) - {"instruction", "input", "answer"}
        if unknown or not self.text.endswith("{answer}") or fields.count("answer") != 1:
            raise ValueError(
                f"PromptTemplate.text must use only {{instruction}}, {{input}} and end with the one {{answer}} "
                f"field, got {self.text!r}; e.g. '{{instruction}}: {{input}}\\n{{answer}}'"
            )

    def prompt(self, example: Example) -> str:
        """The text the model is given (no answer)."""
        return self.text.removesuffix("{answer}").format(instruction=example.instruction, input=example.input)


@dataclass
class InstructionData:
    """A real train/eval split of instruction pairs, the template that renders them, and held-out raw text
    (for bits per byte: how well the model still predicts text of the pretraining kind)."""

    train: list[Example]
    eval: list[Example]
    template: PromptTemplate
    heldout_text: list[str]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"def {node.name}({ast.unparse(node.args)})"


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def stdlib_instructions(
    eval_packages: tuple[str, ...] = TOPICS,
    max_chars: int = 110,
    max_train: int = 3000,
    max_eval: int = 400,
    heldout_chars: int = 16_000,
) -> InstructionData:
    """Pairs from the standard library's public functions: "name" (first docstring sentence -> function name)
    and "summary" (signature -> first docstring sentence). Split by package: eval is `eval_packages` (default
    the packages held out of the testbed's pretraining), so neither the pairs nor their text were ever seen.
    `max_chars` bounds input + answer: at most 53 testbed tokens with the template and end-of-text, so a pair
    fits the 64-token context with 10 positions to spare for a prompt method's virtual tokens. Parsing the
    whole library takes ~10 s, so files are read in a stable hashed order until `max_train` and `max_eval`
    pairs (a sample of every part of the library); `heldout_chars` of the eval packages' source are kept for bits
    per byte. Cached: call it freely (the examples are frozen; copy the lists before changing them)."""
    if not eval_packages:
        raise ValueError("eval_packages must name at least one package to hold out, got ()")
    files = sorted(stdlib_files(), key=lambda f: (f[0] not in eval_packages, _hash(str(f[1].name) + f[0])))
    pairs: dict[tuple[str, str], Example] = {}  # (input, answer) -> example: duplicates kept once
    heldout, counts = [], {True: 0, False: 0}  # pairs so far, eval (True) and train
    for package, path in files:
        held = package in eval_packages
        if counts[held] >= (max_eval if held else max_train) and (not held or sum(map(len, heldout)) >= heldout_chars):
            continue
        source = path.read_text(encoding="utf-8")
        if held and sum(map(len, heldout)) < heldout_chars:
            heldout.append(source[: heldout_chars - sum(map(len, heldout))])
        for node in ast.walk(ast.parse(source)):
            doc = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node)
            if not doc or node.name.startswith("_"):
                continue
            sentence = re.split(r"(?<=[.!?])\s", _first_paragraph(doc))[0]
            if ">>>" in sentence:  # a doctest, not a description
                continue
            for kind, question, answer in (("name", sentence, node.name), ("summary", _signature(node), sentence)):
                if len(question) + len(answer) <= max_chars and (question, answer) not in pairs:
                    pairs[question, answer] = Example(INSTRUCTIONS[kind], question, answer, package)
                    counts[held] += 1
    if not heldout:
        raise ValueError(f"eval_packages {eval_packages!r} name no standard-library package; e.g. {TOPICS}")
    examples = sorted(pairs.values(), key=lambda e: _hash(f"{e.input}\n{e.answer}"))
    train = [e for e in examples if e.source not in eval_packages][:max_train]
    evaluation = [e for e in examples if e.source in eval_packages][:max_eval]
    return InstructionData(train, evaluation, PromptTemplate(), heldout)


def load_instructions(
    name: str = "tatsu-lab/alpaca", data_files: dict[str, str] | None = None, eval_fraction: float = 0.05
) -> InstructionData:
    """`full` scale: a hub instruction data set with `instruction`, `input`, `output` columns (default
    Stanford Alpaca, 52k pairs), or local json/csv files with those columns (how the tests run this code
    offline). Alpaca has one split: eval is a stable hash-chosen `eval_fraction` of it; held-out text is the
    eval answers."""
    from datasets import load_dataset  # optional dependency: pip install minipeft[full]

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if data_files is not None:
        suffix = Path(next(iter(data_files.values()))).suffix.lstrip(".")
        rows = load_dataset({"jsonl": "json"}.get(suffix, suffix), data_files=data_files)["train"]
    else:
        rows = load_dataset(name, split="train")
    # Alpaca's response marker; a newline, not a space, ends the prompt (the answer then starts a token)
    template = PromptTemplate("{instruction}\n{input}\n### Response:\n{answer}")
    train, held = [], []
    for row in rows:
        if not row["output"].strip():
            continue  # a few hub rows have no answer: nothing to learn from
        example = Example(row["instruction"], row["input"], row["output"], name)
        digest = int(_hash(f"{example.instruction}\n{example.input}"), 16)
        (held if digest % 10_000 < eval_fraction * 10_000 else train).append(example)
    return InstructionData(train, held, template, [e.answer for e in held])


def tokenize_instructions(
    examples: list[Example], template: PromptTemplate, tokenizer, max_length: int
) -> TensorDataset:
    """(input_ids, attention_mask, labels), right-padded to `max_length`. The prompt and the answer are
    tokenized apart (the answer starts at a token boundary, as in generation) and the answer ends with the
    end-of-text token, so the model learns to stop. Labels are -100 on the prompt and the padding: the loss
    covers the answer only. An example that does not fit is an error naming it, not a silent cut."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for i, example in enumerate(examples):
        prompt = tokenizer(template.prompt(example), add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) > max_length:
            raise ValueError(
                f"example {i} ({example.input[:40]!r}...): prompt {len(prompt)} + answer {len(answer)} tokens "
                f"(with end-of-text) = {len(prompt) + len(answer)}, more than max_length={max_length} (the "
                f"context left to the text); shorten the example or drop it"
            )
        rows.append((prompt, answer))
    ids = torch.full((len(rows), max_length), pad, dtype=torch.long)  # (N, T)
    mask = torch.zeros_like(ids)  # (N, T)
    labels = torch.full_like(ids, -100)  # (N, T)
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(answer)
    return TensorDataset(ids, mask, labels)


def load_instruction_task() -> InstructionData:
    """Chapter 13's task at the current scale: standard-library pairs (tiny) or Alpaca (full)."""
    return stdlib_instructions() if scale() == "tiny" else load_instructions()
