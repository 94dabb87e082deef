"""Pretrain the book's `tiny` testbed: a GPT-2-class model (4 layers, d=128) with its own
byte-level BPE tokenizer (4096 tokens, as GPT-2's but smaller), both trained on the Python
standard library's own source text, minus the packages of the docstring task
(minipeft.data.TOPICS), which it must never see. Writes minipeft/assets/testbed-gpt/
(config, weights, tokenizer), loadable with AutoModel*/AutoTokenizer.from_pretrained.

Run once (about 12 minutes on 2 CPU cores): python scripts/pretrain_testbed.py
The result is committed, so readers and CI never pay for this.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from minipeft.data import TOPICS, stdlib_files
from minipeft.models import TESTBED_DIR

VOCAB = 4096


def corpus() -> list[str]:
    """All library source outside the held-out packages, one string per file."""
    return [p.read_text(encoding="utf-8", errors="replace") for pkg, p in stdlib_files() if pkg not in TOPICS]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE as GPT-2 does it: every byte is representable, frequent runs merge."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=TESTBED_DIR)
    args = ap.parse_args()
    torch.manual_seed(0)
    texts = corpus()
    tokenizer = train_tokenizer(texts)
    eos = tokenizer.eos_token_id
    ids = torch.tensor([i for t in texts for i in [*tokenizer(t)["input_ids"], eos]])  # (N,)
    n_eval = len(ids) // 50
    train_ids, eval_ids = ids[:-n_eval], ids[-n_eval:]
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=128,
        n_layer=4,
        n_head=4,
        # GPT-2's tanh-approximated GELU, computed by torch's fused kernel (gelu_new spells the same formula
        # in five elementwise ops: about 25% of a fine-tuning step on this model).
        activation_function="gelu_pytorch_tanh",
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    T = config.n_positions

    def batch(source: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        start = torch.randint(0, len(source) - T, (args.batch,), generator=gen)
        return torch.stack([source[s : s + T] for s in start])  # (B, T)

    gen, eval_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(train_ids, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            with torch.no_grad():
                model.eval()
                ev = sum(model(input_ids=(e := batch(eval_ids, eval_gen)), labels=e).loss.item() for _ in range(8)) / 8
                model.train()
            print(
                f"step {step:5d}  loss {loss.item():.3f}  eval {ev:.3f} nats/token  {time.time() - t0:.0f}s", flush=True
            )
    # Pretraining used GPT-2's dropout (0.1); the shipped config fine-tunes without it, as LLaMA-style models do:
    # runs of a few dozen steps do not overfit, and on CPU dropout costs a third of a training step.
    model.config.update(dict(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print("saved to", args.out)


if __name__ == "__main__":
    main()
