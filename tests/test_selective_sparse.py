"""Sparse updates (FishMask, diff pruning) against plain-torch references: the Fisher top-k,
AdamW on a dense weight with a masked gradient, the hard-concrete probabilities; plus what the
issue asks of sparse adapters: only selected entries change, files grow with the budget, and
unmerge restores the base bit-exactly for every selective method."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft as mp
from minipeft.core import io
from minipeft.core.layers import innermost
from minipeft.selective import diff_pruning
from minipeft.selective.deltas import delta_layers
from tests.cases import MODELS, outputs

TARGETS = ["c_attn", "c_fc"]
GEN = torch.Generator().manual_seed(3)
BATCHES = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 200, (3, 2, 12), generator=GEN)]


def train(model, steps: int = 3, lr: float = 1e-2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    torch.manual_seed(0)  # the same dropout masks in every run
    model.train()
    for step in range(steps):
        loss = model(**BATCHES[step % len(BATCHES)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return opt


def selected(model) -> dict[str, torch.Tensor]:
    """{module name: selected flat positions} of the default adapter."""
    layers = delta_layers(model.base_model.model, "default")
    return {n: layer.selective_delta["default"]["weight"].indices.long() for n, layer in layers.items()}


def fishmask(sparsity: float = 0.01):
    model = mp.get_peft_model(MODELS["gpt2"](), mp.FishMaskConfig(sparsity=sparsity, target_modules=TARGETS))
    mp.select_by_fisher(model, BATCHES)
    return model


def projected_diff_pruning(sparsity: float = 0.01):
    config = mp.DiffPruningConfig(sparsity=sparsity, target_modules=TARGETS, init_weights=False)
    model = mp.get_peft_model(MODELS["gpt2"](), config)
    train(model)
    mp.project_to_budget(model)
    return model


def test_fisher_selection_is_the_top_k_of_squared_gradients():
    model = fishmask()
    reference = MODELS["gpt2"]()
    names = list(selected(model))
    weights = [reference.get_submodule(n).weight.requires_grad_(True) for n in names]
    fisher = [torch.zeros_like(w) for w in weights]
    for batch in BATCHES:
        for f, g in zip(fisher, torch.autograd.grad(reference(**batch).loss, weights), strict=True):
            f += g.pow(2)
    flat = torch.cat([f.reshape(-1) for f in fisher])
    top = set(torch.topk(flat, model.get_nb_trainable_parameters()[0]).indices.tolist())
    offsets = torch.tensor([0] + [w.numel() for w in weights]).cumsum(0)
    ours = {int(i) + int(offsets[j]) for j, n in enumerate(names) for i in selected(model)[n]}
    assert ours == top


@pytest.mark.parametrize("build", [fishmask, projected_diff_pruning])
def test_only_selected_entries_change(build):
    model = build()
    base = {k: v.clone() for k, v in MODELS["gpt2"]().state_dict().items()}
    train(model)
    chosen = selected(model)
    merged = model.merge_and_unload().state_dict()
    for key, before in base.items():
        module = key.removesuffix(".weight")
        if module in chosen:
            changed = (merged[key] != before).reshape(-1).nonzero().squeeze(1)
            assert set(changed.tolist()) <= set(chosen[module].tolist()), f"{key}: an unselected entry moved"
            assert len(changed) > 0.9 * len(chosen[module]), f"{key}: the selected entries did not train"
        else:
            assert torch.equal(merged[key], before), f"{key} changed but is not targeted"


def test_sparse_training_equals_masked_dense_adamw_with_less_optimizer_state():
    """The honest memory claim: AdamW on the full weight with a masked gradient follows the same path
    as AdamW on the k values, but keeps two moments for every entry instead of for k."""
    model = fishmask()
    masks = {}
    for n, idx in selected(model).items():
        masks[n] = torch.zeros(model.base_model.model.get_submodule(n).weight.numel(), dtype=torch.bool)
        masks[n][idx] = True
    dense = MODELS["gpt2"]()
    for name, p in dense.named_parameters():
        module = name.removesuffix(".weight")
        p.requires_grad_(module in masks)
        if module in masks:
            p.register_hook(lambda g, m=masks[module]: g * m.view_as(g))
    dense_opt, sparse_opt = train(dense), train(model)
    k, total = sum(len(i) for i in selected(model).values()), sum(m.numel() for m in masks.values())
    merged = model.merge_and_unload()
    for n in masks:
        torch.testing.assert_close(merged.get_submodule(n).weight, dense.get_submodule(n).weight, rtol=0, atol=1e-6)

    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)

    assert state_bytes(sparse_opt) == 2 * 4 * k
    assert state_bytes(dense_opt) == 2 * 4 * total


@pytest.mark.parametrize("build", [fishmask, projected_diff_pruning])
def test_sparse_file_grows_with_the_budget_only(build, tmp_path):
    sizes = {}
    for sparsity in (0.005, 0.02, 0.08):
        model = build(sparsity)
        model.save_pretrained(tmp_path / str(sparsity))
        sizes[model.get_nb_trainable_parameters()[0]] = (tmp_path / str(sparsity) / io.WEIGHTS_NAME).stat().st_size
        reloaded = mp.PeftModel.from_pretrained(MODELS["gpt2"](), tmp_path / str(sparsity))
        assert torch.equal(outputs(reloaded, BATCHES[0]["input_ids"]), outputs(model, BATCHES[0]["input_ids"]))
    (k0, s0), *_, (k1, s1) = sorted(sizes.items())
    assert 8.0 <= (s1 - s0) / (k1 - k0) <= 8.01, "an int32 position and an fp32 value per entry"
    assert s0 - 8 * k0 < 2048, "beyond the entries, only the safetensors header"
    dense_bytes = 4 * 2 * (64 * 192 + 64 * 256)
    assert s0 < 0.02 * dense_bytes


METHODS = {
    "bitfit": mp.BitFitConfig(init_weights=False),
    "ln": mp.LNTuningConfig(init_weights=False),
    "partial": mp.PartialConfig(num_last_blocks=1, init_weights=False),
    "diff": mp.DiffPruningConfig(sparsity=0.05, init_weights=False),
    "fish": mp.FishMaskConfig(sparsity=0.05, init_weights=False),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unmerge_restores_the_base_bit_exactly(method):
    model = mp.get_peft_model(MODELS["gpt2"](), copy.deepcopy(METHODS[method]))
    train(model)
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    expected = outputs(model, BATCHES[0]["input_ids"])
    model.merge_adapter()
    merged_weights = dict(model.base_model.model.state_dict())
    assert any(not torch.equal(merged_weights[k], v) for k, v in before.items()), "merge changed nothing"
    torch.testing.assert_close(outputs(model, BATCHES[0]["input_ids"]), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    for key, value in model.base_model.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} not restored exactly"


def test_hard_concrete_gate_is_nonzero_with_the_closed_form_probability():
    """P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)) (Louizos et al., 2018)."""
    config = mp.DiffPruningConfig()
    for log_alpha in (-1.0, 0.0, 2.0):
        config.init_log_alpha = log_alpha
        entry = diff_pruning.HardConcreteDelta(torch.zeros(200_000), config, penalty=0.0)
        torch.manual_seed(0)
        open_fraction = (entry.gate() > 0).float().mean().item()
        expected = torch.sigmoid(torch.tensor(log_alpha - 2 / 3 * torch.log(torch.tensor(0.1 / 1.1)).item()))
        assert abs(open_fraction - expected.item()) < 0.005


def test_l0_penalty_gradient_equals_autograd_of_the_expected_l0():
    config = mp.DiffPruningConfig(init_weights=False)
    entry = diff_pruning.HardConcreteDelta(torch.zeros(50), config, penalty=0.3)
    with torch.no_grad():
        entry.log_alpha.normal_()
    (entry() * 0).sum().backward()  # no loss gradient: only the penalty's
    log_alpha = entry.log_alpha.detach().clone().requires_grad_(True)
    shift = 2 / 3 * torch.log(torch.tensor(0.1 / 1.1))
    (0.3 * torch.sigmoid(log_alpha - shift).sum()).backward()
    torch.testing.assert_close(entry.log_alpha.grad, log_alpha.grad)


def test_projection_keeps_the_largest_diffs_with_their_values():
    config = mp.DiffPruningConfig(sparsity=0.02, target_modules=TARGETS, init_weights=False)
    model = mp.get_peft_model(MODELS["gpt2"](), config)
    train(model)
    layers = delta_layers(model.base_model.model, "default")
    with torch.no_grad():
        diffs = {n: layer.delta("default", "weight").clone() for n, layer in layers.items()}  # eval: z-bar * w
    mp.project_to_budget(model)
    kept, dropped = [], []
    for n, idx in selected(model).items():
        values = layers[n].selective_delta["default"]["weight"].values
        torch.testing.assert_close(values, diffs[n].reshape(-1)[idx], rtol=0, atol=0)
        mask = torch.zeros(diffs[n].numel(), dtype=torch.bool)
        mask[idx] = True
        kept.append(diffs[n].reshape(-1)[mask].abs())
        dropped.append(diffs[n].reshape(-1)[~mask].abs())
    assert torch.cat(kept).min() >= torch.cat(dropped).max()
    assert model.peft_config["default"].selected_counts == {n: len(i) for n, i in selected(model).items()}


def test_penalty_alone_closes_gates():
    config = mp.DiffPruningConfig(target_modules=TARGETS, l0_lambda=10.0)
    model = mp.get_peft_model(MODELS["gpt2"](), config)
    before = diff_pruning.expected_density(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(10):
        opt.zero_grad()
        (outputs(model, BATCHES[0]["input_ids"]) * 0).sum().backward()
        opt.step()
    assert before > 0.98 and diff_pruning.expected_density(model) < 0.6


def test_loaded_sparse_adapter_keeps_training_its_mask_only(tmp_path):
    fishmask().save_pretrained(tmp_path)
    loaded = mp.PeftModel.from_pretrained(MODELS["gpt2"](), tmp_path, is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == sum(loaded.peft_config["default"].selected_counts.values())
    positions = {n: i.clone() for n, i in selected(loaded).items()}
    train(loaded)
    assert all(torch.equal(positions[n], i) for n, i in selected(loaded).items())
    assert not any(innermost(m).weight.requires_grad for m in delta_layers(loaded.base_model.model, "default").values())


def test_parameter_groups_give_the_gates_their_own_learning_rate():
    model = mp.get_peft_model(
        MODELS["gpt2"](), mp.DiffPruningConfig(target_modules=TARGETS, modules_to_save=["lm_head"])
    )
    rest, gates = diff_pruning.parameter_groups(model, lr=1e-3, gate_lr=0.1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in rest["params"] + gates["params"]} == trainable
    assert len(rest["params"]) + len(gates["params"]) == len(trainable)
    assert sum(p.numel() for p in gates["params"]) == 2 * (64 * 192 + 64 * 256)  # one log_alpha per entry
    assert (rest["lr"], gates["lr"]) == (1e-3, 0.1)


def test_reused_fisher_scores_give_the_same_mask():
    model = fishmask(0.02)
    scores = mp.selective.fisher_scores(model, BATCHES)
    again = mp.get_peft_model(MODELS["gpt2"](), mp.FishMaskConfig(sparsity=0.02, target_modules=TARGETS))
    mp.select_by_fisher(again, scores=scores)
    assert all(torch.equal(selected(model)[n], selected(again)[n]) for n in selected(model))


def test_merging_during_training_uses_the_deterministic_gates():
    config = mp.DiffPruningConfig(target_modules=["c_attn"], init_weights=False, init_log_alpha=0.0)
    model = mp.get_peft_model(MODELS["gpt2"](), config)
    model.train()  # gates are sampled in forward, but a merge must add the evaluation diff
    layers = delta_layers(model.base_model.model, "default")
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    gate = (torch.sigmoid(torch.tensor(0.0)) * 1.2 - 0.1).clamp(0, 1)  # the deterministic gate at log_alpha = 0
    expected = {n: before[n] + gate * layer.selective_delta["default"]["weight"].w for n, layer in layers.items()}
    model.merge_adapter()
    for n, layer in layers.items():
        torch.testing.assert_close(layer.weight, expected[n], rtol=0, atol=1e-6)
    model.unmerge_adapter()
    assert all(torch.equal(layer.weight, before[n]) for n, layer in layers.items())
