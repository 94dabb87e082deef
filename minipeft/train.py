"""A small, seeded training loop: AdamW on whatever requires grad, a tqdm bar, periodic
evaluation, and a history that chapters plot. Sequence classification (chapter 01 on) and
instruction tuning of a causal LM with the loss masked over the prompt, greedy generation
and bits per byte (chapter 13).
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.std import tqdm  # a text bar: a widget bar needs a kernel and would stay frozen on the static page

from .additive.prompts import context_size
from .core.model import PeftModel
from .data import Example, InstructionData, TextClassificationData, scale, tokenize, tokenize_instructions


@dataclass
class TrainConfig:
    # Optimizer steps; about 5 s for a PEFT method on the tiny testbed (2 CPU cores).
    steps: int = 150
    # Examples per batch (per step unless grad_accumulation > 1).
    batch_size: int = 32
    # AdamW learning rate; PEFT methods like 1e-3 to 1e-2; full fine-tuning of the testbed 1e-3 (chapter 01),
    # of large pretrained models ~1e-5 to 1e-4.
    lr: float = 3e-3
    # AdamW weight decay; 0 keeps every method's update unshrunk, for a fair comparison.
    weight_decay: float = 0.0
    # Tokens per example. tiny: 32 (docstrings are ~16 tokens at median; their first 32 tokens hold the package
    # signal, and 64 costs 45% more time for no accuracy). full: 128 (SST-2 sentences, GPT-2's tokenizer).
    max_length: int = field(default_factory=lambda: 32 if scale() == "tiny" else 128)
    # Evaluate every this many steps (and at the end).
    eval_every: int = 50
    # Seeds the data order (and nothing else: the model is seeded where it is built).
    seed: int = 0
    # Show a progress bar.
    progress: bool = True
    # Where to train: a GPU when there is one (Colab, full scale), else the CPU.
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    # Batches per optimizer step: the gradient of batch_size x this examples, a large batch in little memory.
    grad_accumulation: int = 1


@dataclass
class History:
    """What happened during training, for tables and plots."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)  # causal LMs: masked loss on the eval pairs
    seconds: float = 0.0  # wall time of the optimizer steps (evaluation excluded)
    trainable: int = 0  # parameters the optimizer updated

    @property
    def accuracy(self) -> float:
        return self.eval_accuracy[-1]

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.steps))


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns that no row of this batch uses (rows are right-padded)."""
    n = int(mask.sum(1).max())
    return ids[:, :n], mask[:, :n]  # (B, n), (B, n)


def by_length(dataset: TensorDataset, batch_size: int) -> list[torch.Tensor]:
    """Index batches of a right-padded dataset, shortest examples first: trimmed, they carry little padding.
    For evaluation, where order does not matter (a row's output does not depend on its batch's padding)."""
    return list(dataset.tensors[1].sum(1).argsort(stable=True).split(batch_size))  # each (b,)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: TensorDataset, batch_size: int = 256, adapter_names: list[str] | None = None
) -> torch.Tensor:
    """The predicted class of every example of a tokenized dataset (input_ids, attention_mask, ...), in its
    order; `adapter_names` routes each row to an adapter (a mixed batch, chapter 11)."""
    if adapter_names is not None and len(adapter_names) != len(dataset):
        raise ValueError(f"adapter_names needs one name per example ({len(dataset)}), got {len(adapter_names)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty(len(dataset), dtype=torch.long)  # (N,)
    for idx in by_length(dataset, batch_size):
        ids, mask = trim(dataset.tensors[0][idx].to(device), dataset.tensors[1][idx].to(device))  # (b, n) each
        routes = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
        out[idx] = model(input_ids=ids, attention_mask=mask, **routes).logits.argmax(-1).cpu()  # (b,)
    model.train(was_training)
    return out


def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> float:
    """Accuracy of `model` on a tokenized dataset (input_ids, attention_mask, labels)."""
    return (predict(model, dataset, batch_size) == dataset.tensors[2]).sum().item() / len(dataset)


def fit(
    model: nn.Module,
    train_set: TensorDataset,
    config: TrainConfig,
    backward: Callable[[list[tuple[torch.Tensor, ...]]], float],
    evaluate_now: Callable[[], float],
    metric: str,
    after_step: Callable[[int], object] | None = None,
) -> History:
    """The loop every trainer shares: AdamW on whatever requires grad, seeded batches, the bar, the history.
    Each optimizer step hands `grad_accumulation` batches (moved to the device) to `backward`, which computes
    the loss, calls backward and returns the loss; `evaluate_now()` is recorded in `history.<metric>`."""
    accumulate = config.grad_accumulation
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ValueError(f"TrainConfig.grad_accumulation must be an integer >= 1, got {accumulate!r}")
    if -(-len(train_set) // config.batch_size) < accumulate:  # fewer batches than one step takes
        raise ValueError(
            f"TrainConfig.grad_accumulation={accumulate} batches of {config.batch_size} need at least "
            f"{config.batch_size * (accumulate - 1) + 1} training examples, got {len(train_set)}"
        )
    model.to(config.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter of the model requires grad: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history = History(trainable=sum(p.numel() for p in params))
    model.train()
    step = 0
    bar = tqdm(total=config.steps, disable=not config.progress, leave=False, desc="train")
    while step < config.steps:
        batches = iter(DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=gen))
        for group in zip(*[batches] * accumulate, strict=False):  # a step's batches; a short tail waits
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = backward([tuple(t.to(config.device) for t in batch) for batch in group])
            optimizer.step()
            if after_step is not None:
                after_step(step + 1)
            history.seconds += time.perf_counter() - start
            step += 1
            history.steps.append(step)
            history.train_loss.append(loss)
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                history.eval_steps.append(step)
                getattr(history, metric).append(evaluate_now())
            if step == config.steps:
                break
    bar.close()
    model.eval()
    return history


def train_classifier(
    model: nn.Module,
    data: TextClassificationData,
    tokenizer,
    config: TrainConfig | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], object] | None = None,
) -> History:
    """Fine-tune whatever in `model` requires grad on `data`; return the history.

    Hooks for methods that steer their own training (AdaLoRA, chapter 07): `extra_loss()` is added
    to the loss (a regulariser), `after_step(step)` runs after each optimizer step, gradients intact."""
    config = config or TrainConfig()
    train_set = tokenize(data.train_texts, data.train_labels, tokenizer, config.max_length)
    eval_set = tokenize(data.eval_texts, data.eval_labels, tokenizer, config.max_length)

    def backward(group: list[tuple[torch.Tensor, ...]]) -> float:
        total = 0.0
        for i, (ids, mask, labels) in enumerate(group):  # equal batches: the mean of their means
            ids, mask = trim(ids, mask)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(group)
            (loss if extra_loss is None or i else loss + extra_loss()).backward()
            total += loss.item()
        return total

    return fit(model, train_set, config, backward, lambda: evaluate(model, eval_set), "eval_accuracy", after_step)


# -- causal LMs: instruction tuning and generation (chapter 13) ------------------------------------------------


@dataclass
class CausalLMConfig(TrainConfig):
    # Tokens per pair, prompt + answer + end-of-text. tiny: the testbed's whole context (64 positions; a prompt
    # method's virtual tokens take some, and the examples must fit what is left). full: 256 (Alpaca, GPT-2).
    max_length: int = field(default_factory=lambda: 64 if scale() == "tiny" else 256)
    # Loss over the answer only (the SFT objective, p(answer | prompt)); False scores the prompt's tokens too (the
    # unmasked objective chapter 13 compares it with). The eval loss is over the answer either way.
    mask_prompt: bool = True


def virtual_tokens(model: nn.Module) -> int:
    """Positions the active prompt-style adapter puts before the text (0 for a plain model or layer methods)."""
    if not isinstance(model, PeftModel):
        return 0
    return sum(getattr(model.peft_config[name], "num_virtual_tokens", 0) for name in model.active_adapters)


def room(model: nn.Module) -> int:
    """Positions left to the text: the context minus the virtual tokens."""
    return context_size(model) - virtual_tokens(model)  # a PeftModel reads its base's config


def masked_lm_loss(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not -100 (the answers)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :]  # (B, T, V): virtual ones dropped
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )


def _trim3(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ids, mask = trim(ids, mask)
    return ids, mask, labels[:, : ids.shape[1]]  # (B, n) each


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: TensorDataset, batch_size: int = 128) -> float:
    """The masked loss over a tokenized instruction set, a mean over its answer tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in by_length(dataset, batch_size):
        ids, mask, labels = _trim3(*(t[idx].to(device) for t in dataset.tensors))
        total += masked_lm_loss(model, ids, mask, labels, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return total / count


def train_causal_lm(
    model: nn.Module,
    data: InstructionData,
    tokenizer,
    config: CausalLMConfig | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], object] | None = None,
) -> History:
    """Supervised fine-tuning of whatever in `model` requires grad (a PeftModel of any method that runs on a
    causal LM, or a plain model: full fine-tuning) on `data`'s pairs, the loss over the answer tokens only.
    With accumulation a step's loss is the mean over all its answer tokens, as one large batch. Every pair is
    checked to fit the context before anything trains. The history's eval_loss is the masked loss on eval."""
    config = config or CausalLMConfig()
    length = min(config.max_length, room(model))
    train_set = tokenize_instructions(data.train, data.template, tokenizer, length)
    eval_set = tokenize_instructions(data.eval, data.template, tokenizer, length)
    if not config.mask_prompt:  # every real token is a target; -100 stays on the padding only
        ids, mask, _ = train_set.tensors  # (N, T) each
        train_set = TensorDataset(ids, mask, ids.masked_fill(mask == 0, -100))

    def backward(group: list[tuple[torch.Tensor, ...]]) -> float:
        group = [_trim3(*batch) for batch in group]
        tokens = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in group)
        total = 0.0
        for i, (ids, mask, labels) in enumerate(group):
            loss = masked_lm_loss(model, ids, mask, labels, reduction="sum") / tokens
            total += loss.item()
            (loss if extra_loss is None or i else loss + extra_loss()).backward()
        return total

    return fit(model, train_set, config, backward, lambda: evaluate_loss(model, eval_set), "eval_loss", after_step)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    use_cache: bool = True,
    adapter_names: list[str] | None = None,
) -> list[list[int]]:
    """Greedy continuations of equal-length prompts `ids` (B, T), each cut after its end-of-text token.
    use_cache=True: `generate` with the KV cache (what serving does); False: one full forward per new
    token (the definition, the reference the cached path must equal). `adapter_names` (a PeftModel): one
    adapter per row, a mixed batch (chapter 11)."""
    ones = torch.ones_like(ids)  # (B, T): no padding, the prompts share a length
    rows = {} if adapter_names is None else {"adapter_names": adapter_names}
    if use_cache:
        out = model.generate(
            input_ids=ids,
            **rows,
            attention_mask=ones,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
            use_cache=True,
        )[:, ids.shape[1] :]  # (B, <= max_new_tokens)
    else:
        out = ids[:, :0]
        for _ in range(max_new_tokens):
            seq = torch.cat([ids, out], dim=1)  # (B, T + t)
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq), **rows).logits[:, -1].argmax(-1)  # (B,)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if (out == eos_token_id).any(1).all():
                break
    tokens = [row.tolist() for row in out]
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in tokens]


def bits_per_byte(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """How well the model predicts raw text: total next-token loss in bits over the UTF-8 bytes of the
    predicted tokens. Texts are cut into windows that fill the context; each window's first token is
    given, the rest predicted. Comparable across tokenizers, unlike a loss per token."""
    width = room(model)
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [ids[i : i + width] for i in range(0, len(ids), width) if len(ids[i : i + width]) > 1]
    if not windows:
        raise ValueError("bits_per_byte needs text of at least two tokens, got none")
    n_bytes = sum(len(tokenizer.decode(w[1:]).encode("utf-8")) for w in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)  # (N, W), right-padded
    for i, w in enumerate(windows):
        ids[i, : len(w)] = torch.tensor(w)
    mask = (torch.arange(width) < torch.tensor([len(w) for w in windows])[:, None]).long()  # (N, W)
    labels = ids.masked_fill(mask == 0, -100)  # (N, W): every real token after the first is predicted
    nats = evaluate_loss(model, TensorDataset(ids, mask, labels), batch_size) * int((labels[:, 1:] != -100).sum())
    return nats / math.log(2) / n_bytes


@dataclass
class GenerationResult:
    """Greedy answers to held-out prompts and how close they are."""

    predictions: list[str]
    answers: list[str]
    exact_match: float  # share of answers reproduced exactly (surrounding spaces aside)
    similarity: float  # mean character-level similarity, difflib's ratio 2M / (|a| + |b|), in [0, 1]
    bits_per_byte: float | None  # on the data's held-out raw text; None when it has none


def evaluate_generation(
    model: nn.Module,
    data: InstructionData,
    tokenizer,
    examples: list[Example] | None = None,
    max_new_tokens: int = 40,
    batch_size: int = 64,
) -> GenerationResult:
    """Greedy decoding (KV cache) of the answers to `examples` (default: data.eval), scored against the
    reference answers, and bits per byte on data.heldout_text. Prompts are batched by length, so no row is
    padded and every row's answer equals its generation alone. Works on a PeftModel or a plain model."""
    was_training = model.training
    model.eval()
    examples = data.eval if examples is None else examples
    width = room(model)
    device = next(model.parameters()).device
    prompts = [tokenizer(data.template.prompt(e), add_special_tokens=False)["input_ids"] for e in examples]
    for i, p in enumerate(prompts):
        if len(p) >= width:
            raise ValueError(
                f"example {i}: its prompt has {len(p)} tokens, but the model has {width} positions for text "
                f"(context minus virtual tokens): no room to answer; shorten the prompt"
            )
    predictions = [""] * len(examples)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    eos = tokenizer.eos_token_id
    for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)  # (b, length)
            for i, new in zip(
                chunk, greedy_generate(model, ids, min(max_new_tokens, width - length), eos), strict=True
            ):
                predictions[i] = tokenizer.decode([t for t in new if t != eos]).strip()
    answers = [e.answer.strip() for e in examples]
    pairs = list(zip(predictions, answers, strict=True))
    bpb = bits_per_byte(model, tokenizer, data.heldout_text) if data.heldout_text else None
    model.train(was_training)
    return GenerationResult(
        predictions,
        answers,
        exact_match=sum(p == a for p, a in pairs) / max(1, len(pairs)),
        similarity=sum(difflib.SequenceMatcher(None, p, a).ratio() for p, a in pairs) / max(1, len(pairs)),
        bits_per_byte=bpb,
    )
