"""LoRA speed on a GPT-2-small-shaped model (random weights, CPU), side by side in one run.

Prints ratios (lower is better for the first; 1.0 means equal):
  1. minipeft LoRA train step / HF peft LoRA train step  (forward + backward + AdamW; target <= 1.0)
  2. unmerged LoRA forward / base forward                 (the price of not merging)
  3. merged LoRA forward / base forward                   (target within 3%)

Timings interleave the contenders round by round, in a shuffled order, and report medians, so that machine
noise hits all of them alike. Usage: python benchmarks/bench_lora.py [--rounds 21]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import peft
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import minipeft as mp


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config()).eval()  # 124M parameters, GPT-2 small's shape
    ids = torch.randint(0, 50257, (args.batch, args.seq))
    settings = dict(r=args.r, lora_alpha=16, target_modules=["c_attn"])

    ours = mp.get_peft_model(copy.deepcopy(base), mp.LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    merged = mp.get_peft_model(copy.deepcopy(base), mp.LoraConfig(init_lora_weights=False, **settings))
    merged.merge_adapter()

    def train_step(model, opt):
        def step():
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    steps = {
        "minipeft": train_step(ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)),
        "peft": train_step(theirs, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)),
    }

    def forward(model):
        def run():
            with torch.no_grad():  # inference: no graph, whichever parameters require grad
                model(input_ids=ids)

        return run

    forwards = {"base": forward(base), "unmerged": forward(ours), "merged": forward(merged)}
    times: dict[str, list[float]] = {k: [] for k in [*steps, *forwards]}
    for fn in [*steps.values(), *forwards.values()]:
        fn()  # warm-up
    order = random.Random(0)
    for _ in range(args.rounds):
        contenders = [*steps.items(), *forwards.items()]
        order.shuffle(contenders)  # a new order each round: no contender always follows the same one
        for name, fn in contenders:
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"GPT-2 small shape, batch {args.batch} x {args.seq} tokens, LoRA r={args.r} on c_attn, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)"
    )
    for name, t in med.items():
        print(f"  {name:>9}: {t * 1000:8.1f} ms")
    print(f"minipeft / peft train step : {med['minipeft'] / med['peft']:.3f}   (target <= 1.0)")
    print(f"unmerged / base forward    : {med['unmerged'] / med['base']:.3f}")
    print(f"merged / base forward      : {med['merged'] / med['base']:.3f}   (target <= 1.03)")


if __name__ == "__main__":
    main()
