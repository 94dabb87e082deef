"""What each of chapter 07's methods promises beyond the shared properties, checked against plain-torch
references: DoRA's detached norm, PiSSA's principal subspace, AdaLoRA's allocator, VeRA's shared seeded
matrices, LoHa's and LoKr's ranks, and the Fastfood subspace of the intrinsic dimension."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft as mp
from minipeft.models import tiny_gpt2, tiny_llama
from minipeft.reparameterized import intrinsic
from minipeft.reparameterized.lora import LoraLayer
from tests.cases import outputs

IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(3))


def test_dora_gradients_treat_the_norm_as_a_constant():
    """A plain-torch DoRA with n detached gives the same gradients; without detaching they differ."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLayer(base)
    layer.add_adapter("default", mp.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False))
    x = torch.randn(5, 16)
    layer(x).pow(2).sum().backward()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]]

    def reference(detach: bool) -> list[torch.Tensor]:
        a, b, m = (p.detach().clone().requires_grad_() for p in params)
        v = base.weight + 2.0 * b @ a  # (8, 16): W0 + s B A
        n = v.norm(dim=1, keepdim=True)
        w = m[:, None] * v / (n.detach() if detach else n)
        (x @ w.T + base.bias).pow(2).sum().backward()
        return [a.grad, b.grad, m.grad]

    for ours, ref in zip([p.grad for p in params], reference(detach=True), strict=True):
        torch.testing.assert_close(ours, ref)
    assert not torch.allclose(params[0].grad, reference(detach=False)[0], atol=1e-6)


def test_dora_magnitude_starts_at_the_row_norms():
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], layer.weight.T.norm(dim=1))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_pissa_adapter_is_the_best_rank_r_approximation(make):
    reference = make()
    model = mp.get_peft_model(
        make(), mp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa")
    )
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=0, atol=1e-5)  # fp32, unchanged
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    w0 = layer.weight.T if layer.fan_in_fan_out else layer.weight
    w0 = w0 + layer.delta_weight("default")  # residual + s B A
    sigma = torch.linalg.svdvals(w0)
    # Eckart-Young: the residual of the best rank-4 approximation has norm sqrt(sum of the other sigma^2).
    residual = w0 - layer.delta_weight("default")
    torch.testing.assert_close(residual.norm(), sigma[4:].pow(2).sum().sqrt(), rtol=1e-4, atol=0)


def test_pissa_disable_gives_the_residual_model():
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="pissa"))
    merged = copy.deepcopy(model).merge_and_unload()  # W_res + s B A = W0 again
    plain = tiny_gpt2()
    with torch.no_grad():
        for i, block in enumerate(plain.transformer.h):
            layer = model.base_model.model.transformer.h[i].attn.c_attn
            block.attn.c_attn.weight.copy_(layer.weight)  # the residual the base now holds
    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, IDS), outputs(plain, IDS), rtol=0, atol=0)
        assert not torch.allclose(outputs(model, IDS), outputs(tiny_gpt2(), IDS), atol=1e-3)
    torch.testing.assert_close(outputs(merged, IDS), outputs(tiny_gpt2(), IDS), rtol=0, atol=1e-5)


def adalora_model(**kwargs):
    config = mp.AdaLoraConfig(
        **{"init_r": 6, "target_r": 2, "total_step": 30, "target_modules": "all-linear", **kwargs}
    )
    return mp.get_peft_model(tiny_llama(), config)


def test_adalora_budget_follows_the_cubic_schedule():
    allocator = mp.RankAllocator(adalora_model(tinit=5, tfinal=5))
    b0, bt = 6 * 14, 2 * 14  # 14 adapted matrices
    assert [allocator.budget(t) for t in (0, 5, 25, 26, 30)] == [b0, b0, bt, bt, bt]
    for t in range(6, 25):
        assert allocator.budget(t) == int(bt + (b0 - bt) * (1 - (t - 5) / 20) ** 3)


def test_adalora_training_ends_at_the_target_budget():
    model = adalora_model(tinit=3, tfinal=4, total_step=16, init_lora_weights=False)
    allocator = mp.RankAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 17):
        loss = outputs(model, IDS).pow(2).mean() + allocator.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
        allocator.update_and_allocate(step)
        if step == 3:
            assert sum(allocator.ranks().values()) == 6 * 14  # warm-up: nothing pruned yet
    ranks = allocator.ranks()
    assert sum(ranks.values()) == 2 * 14 and len(set(ranks.values())) > 1, ranks  # budget moved between layers


def test_adalora_importance_is_smoothed_sensitivity_times_uncertainty():
    allocator = mp.RankAllocator(adalora_model(beta1=0.5, beta2=0.75))
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    smooth, unc = torch.zeros(2), torch.zeros(2)
    for grad in ([0.5, 0.5], [1.0, -3.0]):
        p.grad = torch.tensor(grad)
        sensitivity = (p * p.grad).abs()
        smooth = 0.5 * smooth + 0.5 * sensitivity
        unc = 0.75 * unc + 0.25 * (sensitivity - smooth).abs()
        torch.testing.assert_close(allocator.score(p), smooth * unc)


def test_adalora_regulariser_vanishes_on_orthonormal_factors():
    model = adalora_model(orth_reg_weight=1.0)
    allocator = mp.RankAllocator(model)
    assert allocator.regularizer() > 1.0  # N(0, 0.02) factors are far from orthonormal
    with torch.no_grad():
        for layer in allocator.layers:
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            a.copy_(torch.linalg.qr(torch.randn(a.shape[1], a.shape[0]))[0].T)  # orthonormal rows
            b.copy_(torch.linalg.qr(torch.randn(b.shape))[0])  # orthonormal columns
    assert allocator.regularizer() < 1e-9


def test_vera_matrices_are_shared_and_regenerated_from_the_seed():
    def vera(seed):
        return mp.get_peft_model(
            tiny_gpt2(), mp.VeraConfig(r=16, target_modules=["c_attn", "c_fc"], projection_prng_key=seed)
        )

    model = vera(3).to(torch.float64)
    layers = [m for m in model.modules() if isinstance(m, mp.reparameterized.VeraLayer)]
    projections = {id(m.vera_projection["default"]) for m in layers}
    assert len(projections) == 1 and layers[0].vera_projection["default"].A.dtype == torch.float64
    again, other = vera(3), vera(4)
    a = layers[0].vera_projection["default"].A
    assert torch.equal(
        a.float(), next(m for m in again.modules() if isinstance(m, type(layers[0]))).vera_projection["default"].A
    )
    assert not torch.equal(
        a.float(), next(m for m in other.modules() if isinstance(m, type(layers[0]))).vera_projection["default"].A
    )


def test_loha_and_lokr_exceed_the_rank_of_their_factors():
    loha = mp.get_peft_model(tiny_gpt2(), mp.LoHaConfig(r=3, target_modules=["c_attn"], init_weights=False))
    layer = loha.base_model.model.transformer.h[0].attn.c_attn
    assert torch.linalg.matrix_rank(layer.delta_weight("default")) == 9  # r^2
    lokr = mp.get_peft_model(tiny_gpt2(), mp.LoKrConfig(r=1, target_modules=["c_attn"], init_weights=False))
    layer = lokr.base_model.model.transformer.h[0].attn.c_attn
    w1, w2 = layer.factor(1, "default"), layer.factor(2, "default")  # (12, 8) full, (16, 8) of rank 1
    assert torch.linalg.matrix_rank(layer.delta_weight("default")) == 8 * 1  # rank(W1) * rank(W2)
    torch.testing.assert_close(layer.delta_weight("default"), torch.kron(w1, w2) * layer.scaling["default"])


def sylvester(n: int) -> torch.Tensor:
    """The n x n Walsh-Hadamard matrix, built by Sylvester's recursion."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_fastfood_equals_its_dense_matrix():
    d, size = 20, 200  # n = 32, 7 blocks, the last one cut
    ff = intrinsic.Fastfood(d, size, seed=1)
    h = sylvester(32)
    blocks = []
    for sign, perm, gauss in zip(ff.sign, ff.perm, ff.gauss, strict=True):
        permute = torch.eye(32)[perm]  # row i picks entry perm[i]
        blocks.append(h @ torch.diag(gauss) @ permute @ h @ torch.diag(sign))
    dense = torch.cat(blocks)[:size, :d]  # (D, d)
    theta = torch.randn(d)
    torch.testing.assert_close(ff(theta), dense @ theta)
    torch.testing.assert_close(torch.cat(blocks).norm(dim=1), torch.ones(7 * 32))  # unit-norm rows


def test_intrinsic_subspace_is_shared_and_saved_as_one_vector(tmp_path):
    config = mp.IntrinsicConfig(intrinsic_dim=10, target_modules=["c_attn", "c_fc"], init_weights=False)
    model = mp.get_peft_model(tiny_gpt2(), config)
    assert model.peft_config["default"].projected_size == 2 * (64 * 192 + 64 * 256)
    assert config.projected_size is None, "the caller's config describes; the model's copy records D"
    layers = [m for m in model.modules() if isinstance(m, mp.reparameterized.IntrinsicLayer)]
    assert len({id(m.theta["default"]) for m in layers}) == 1
    model.save_pretrained(tmp_path)
    saved = mp.core.io.load_adapter_files(tmp_path)[1]
    assert list(saved) == ["base_model.model.transformer.h.0.attn.c_attn.intrinsic_theta"]
    assert saved["base_model.model.transformer.h.0.attn.c_attn.intrinsic_theta"].shape == (10,)


def test_training_loop_hooks_drive_adalora():
    """train_classifier adds `extra_loss()` to the loss and calls `after_step(step)` after each optimizer step."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from minipeft.data import TextClassificationData
    from minipeft.models import testbed_tokenizer
    from minipeft.train import TrainConfig, train_classifier

    tokenizer = testbed_tokenizer()
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64, pad_token_id=0)
    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(config)
    model = mp.get_peft_model(base, mp.AdaLoraConfig(init_r=4, target_r=1, total_step=6, target_modules=["c_attn"]))
    allocator = mp.RankAllocator(model)
    texts = ["def f(x): return x", "import os", "class A: pass", "print(1)"] * 2
    data = TextClassificationData(texts, [0, 1, 0, 1] * 2, texts[:4], [0, 1, 0, 1], ["a", "b"])
    steps, extra_calls = [], []

    def extra_loss():
        extra_calls.append(1)
        return allocator.regularizer()

    def after_step(step):
        steps.append(step)
        return allocator.update_and_allocate(step)

    cfg = TrainConfig(steps=6, batch_size=4, eval_every=6, progress=False, device="cpu")
    train_classifier(model, data, tokenizer, cfg, extra_loss=extra_loss, after_step=after_step)
    assert steps == [1, 2, 3, 4, 5, 6] and len(extra_calls) == 6
    assert list(allocator.ranks().values()) == [1]  # one adapted matrix, pruned from rank 4 to the target 1
