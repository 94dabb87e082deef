"""The short learning-rate sweep behind `minipeft.experiment.LEARNING_RATES`.

Every method the chapters train, in the configuration the chapters use, on the tiny testbed (docstring topics,
AdamW, batch 32, 40 steps, the head trained with it), at learning rates 1e-3 ... 1e-1 (full fine-tuning 1e-4 ...
3e-3), two seeds each. The chosen rate is the one with the best mean accuracy; ties go to the smaller rate.
Writes benchmarks/results/lr_sweep.csv (one row per run, with the date and the machine) and prints the rule.

    python benchmarks/sweep_lr.py             # the whole sweep (about 15 minutes on 2 cores)
    python benchmarks/sweep_lr.py LORA IA3    # some methods only (their rows are replaced)
"""

from __future__ import annotations

import csv
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

import minipeft as mp
from minipeft.data import load_task
from minipeft.experiment import full_fine_tuning, linear_probe, machine
from minipeft.models import load_classifier
from minipeft.train import TrainConfig, train_classifier

OUT = Path(os.environ.get("SWEEP_OUT", Path(__file__).parent / "results" / "lr_sweep.csv"))  # SWEEP_OUT: elsewhere
STEPS, SEEDS = 40, (0, 1)
RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
FULL_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
HEAD = ["score"]
ALL = ["c_attn", "c_proj", "c_fc"]
CONFIGS = {  # peft_type: the configuration the chapters train
    "LORA": lambda: mp.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], modules_to_save=HEAD),
    "ADALORA": lambda: mp.AdaLoraConfig(
        init_r=8,
        target_r=4,
        lora_alpha=8,
        total_step=STEPS,
        tinit=5,
        tfinal=10,
        target_modules=ALL,
        modules_to_save=HEAD,
    ),
    "VERA": lambda: mp.VeraConfig(r=128, target_modules=ALL, modules_to_save=HEAD),
    "LOHA": lambda: mp.LoHaConfig(r=4, alpha=8, target_modules=ALL, modules_to_save=HEAD),
    "LOKR": lambda: mp.LoKrConfig(r=4, alpha=8, target_modules=ALL, modules_to_save=HEAD),
    "INTRINSIC": lambda: mp.IntrinsicConfig(intrinsic_dim=2048, target_modules=ALL, modules_to_save=HEAD),
    "ADAPTER": lambda: mp.AdapterConfig(bottleneck_size=8, placement="pfeiffer", modules_to_save=HEAD),
    "PARALLEL_ADAPTER": lambda: mp.ParallelAdapterConfig(bottleneck_size=8, scaling=4.0, modules_to_save=HEAD),
    "COMPACTER": lambda: mp.CompacterConfig(bottleneck_size=16, modules_to_save=HEAD),
    "PROMPT_TUNING": lambda: mp.PromptTuningConfig(num_virtual_tokens=8, modules_to_save=HEAD),
    "P_TUNING": lambda: mp.PTuningConfig(num_virtual_tokens=8, modules_to_save=HEAD),
    "PREFIX_TUNING": lambda: mp.PrefixTuningConfig(num_virtual_tokens=8, modules_to_save=HEAD),  # MLP re-param.
    "IA3": lambda: mp.IA3Config(modules_to_save=HEAD),
    "BITFIT": lambda: mp.BitFitConfig(modules_to_save=HEAD),
    "LN_TUNING": lambda: mp.LNTuningConfig(modules_to_save=HEAD),
    "PARTIAL": lambda: mp.PartialConfig(num_last_blocks=1, modules_to_save=HEAD),
    "FISHMASK": lambda: mp.FishMaskConfig(sparsity=0.01, target_modules=ALL, modules_to_save=HEAD),
    "MAM": lambda: mp.MAMConfig(
        num_virtual_tokens=8,
        prefix_projection=False,
        encoder_hidden_size=None,
        bottleneck_size=16,
        modules_to_save=HEAD,
    ),
    "UNIPELT": lambda: mp.UniPELTConfig(
        r=4,
        num_virtual_tokens=8,
        reduction_factor=16,
        prefix_projection=False,
        encoder_hidden_size=None,
        modules_to_save=HEAD,
    ),
}


def build(method: str, seed: int, data, tokenizer):
    base, _ = load_classifier(len(data.label_names), seed=seed)
    if method == "FULL":
        return full_fine_tuning(base), {}
    if method == "PROBE":
        return linear_probe(base), {}
    torch.manual_seed(seed)
    model = mp.get_peft_model(base, CONFIGS[method]())
    if method == "FISHMASK":
        from minipeft.data import tokenize

        ids, mask, labels = tokenize(data.train_texts[:64], data.train_labels[:64], tokenizer, 32).tensors
        mp.select_by_fisher(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    if method == "ADALORA":
        allocator = mp.RankAllocator(model)
        return model, dict(extra_loss=allocator.regularizer, after_step=allocator.update_and_allocate)
    return model, {}


def chosen(rows: list[dict]) -> dict[str, float]:
    """The rule: per method, the rate with the best mean accuracy over seeds (ties: the smaller rate)."""
    means: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        means.setdefault(r["method"], {}).setdefault(float(r["lr"]), []).append(float(r["accuracy"]))
    return {m: min(by_lr, key=lambda lr: (-round(statistics.fmean(by_lr[lr]), 6), lr)) for m, by_lr in means.items()}


def main(methods: list[str]) -> None:
    data = load_task()
    _, tokenizer = load_classifier(len(data.label_names))
    old = list(csv.DictReader(open(OUT))) if OUT.exists() else []
    rows = [r for r in old if r["method"] not in methods]
    today = datetime.date.today().isoformat()
    for method in methods:
        for lr in FULL_RATES if method == "FULL" else RATES:
            for seed in SEEDS:
                model, hooks = build(method, seed, data, tokenizer)
                config = TrainConfig(steps=STEPS, lr=lr, seed=seed, eval_every=STEPS, progress=False)
                h = train_classifier(model, data, tokenizer, config, **hooks)
                rows.append({"method": method, "lr": lr, "seed": seed, "steps": STEPS, "accuracy": f"{h.accuracy:.4f}",
                             "trainable": h.trainable, "date": today, "machine": machine()})  # fmt: skip
                print(f"{method:17s} lr={lr:<7g} seed={seed} accuracy={h.accuracy:.3f}", flush=True)
        OUT.parent.mkdir(exist_ok=True)
        with open(OUT, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print("LEARNING_RATES =", chosen(rows))


if __name__ == "__main__":
    main(sys.argv[1:] or [*CONFIGS, "FULL", "PROBE"])
