"""What autograd keeps for the backward pass of a transformer, counted from its shapes: the
activation part of the memory estimator (memory.py). Taught in chapter 09.

Every operation saves what its backward needs, and only when a gradient must pass through
it: a LayerNorm keeps its input, a GELU its input and intermediate products, attention its
queries, keys, values and output (and the T x T probabilities when they are materialised).
A linear layer keeps its input only if its *weight* trains (full fine-tuning) or carries a
LoRA adapter (then also the rank-r intermediate); a frozen linear keeps nothing. Nothing is
saved before the first trainable parameter, since no gradient flows there.

The recipes list, per architecture and in forward order, the tensors the transformers
implementations save on CPU (checked against measured tensors in tests/test_memory_estimate.py),
in elements per token. Keys make a tensor saved by two ops count once. With gradient
checkpointing only each block's input is kept, and one block is recomputed at a time.
"""

from __future__ import annotations

from torch import nn

from .core.layers import ModulesToSaveWrapper, TunerLayer, innermost
from .reparameterized.lora import LoraLayer

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Tensors an MLP activation saves, in units of its input (gelu_new is a tanh formula with 4 saved parts).
ACT_SAVES = {"gelu_new": 4, "gelu": 1, "gelu_pytorch_tanh": 1, "relu": 1, "silu": 1}


class Ledger:
    """The tensors one part of the model (embeddings, one block, the head) saves: {key: bytes per token}."""

    def __init__(self, part: nn.Module, order: list[str], start: int, config, setup) -> None:
        self.part, self.order, self.start, self.config, self.setup = part, order, start, config, setup
        self.e, self.saved = DTYPE_BYTES[setup.dtype], {}

    def save(self, key: str, elements: float, nbytes: int | None = None) -> None:
        self.saved[key] = elements * (nbytes or self.e)

    def flows(self, op: str) -> bool:
        """A gradient reaches the input of `op`: it comes after the first trainable op."""
        return self.order.index(op) > self.start

    def module(self, op: str) -> nn.Module:
        module = self.part.get_submodule(op)
        if isinstance(module, ModulesToSaveWrapper):  # a trained copy, e.g. a new head
            module = module.modules_to_save[module.active_adapters[0]]
        return module

    def trains(self, op: str) -> bool:
        module = self.module(op)  # its own parameters; a wrapper's adapters count as its own
        return any(p.requires_grad for p in module.parameters(recurse=isinstance(module, TunerLayer)))

    def linear(self, op: str, in_key: str, d_in: int) -> None:
        """The input, if the weight trains or a LoRA adapter needs it; LoRA's A x besides."""
        module = self.module(op)
        weight = getattr(innermost(module), "weight", None)
        if isinstance(weight, nn.Parameter) and weight.requires_grad:
            self.save(in_key, d_in)
        if isinstance(module, LoraLayer):
            name = module.active_adapters[0]
            if self.setup.dropout and getattr(module.lora_dropout[name], "p", 0.0) > 0:
                self.save(f"{op}.lora_x", d_in)  # the dropped input replaces x
                self.dropout(op, 1.0, d_in)  # and its mask, if a gradient flows into x
            else:
                self.save(in_key, d_in)
            self.save(f"{op}.lora_mid", module.lora_A[name].out_features)  # A x: (B, T, r)

    def layer_norm(self, op: str, in_key: str, d: int) -> None:
        if self.flows(op) or self.trains(op):
            self.save(in_key, d), self.save(f"{op}.stats", 2)  # input, mean and 1/std

    def rms_norm(self, op: str, in_key: str, d: int) -> None:
        """LLaMA's RMSNorm computes in fp32: an fp32 copy of its input and 1/rms per token."""
        if self.flows(op):  # in fp32 the "copy" is the input itself
            self.save(in_key if self.e == 4 else f"{in_key}.fp32", d, 4), self.save(f"{op}.rstd", 1, 4)
        if self.trains(op):
            self.save(f"{op}.normed", d)  # for the weight's gradient

    def dropout(self, op: str, p: float, d: int) -> None:
        if self.setup.dropout and p > 0 and self.flows(op):
            self.save(f"{op}.mask", d)  # on CPU the mask has the activations' dtype

    def total(self) -> float:
        return sum(self.saved.values())


def gpt2(config, setup) -> dict:
    d, f, H, T = config.n_embd, config.n_inner or 4 * config.n_embd, config.n_head, setup.seq_len
    fused = setup.attention == "fused"

    def embed(b: Ledger) -> None:
        if b.trains("wte"):
            b.save("ids", 1, 8)  # int64 token ids for the embedding's gradient
        b.dropout("drop", config.embd_pdrop, d)

    def block(b: Ledger) -> None:
        b.layer_norm("ln_1", "x", d)
        b.linear("attn.c_attn", "ln_1.out", d)
        if b.flows("attn") and fused:  # PyTorch's flash kernel: q, k, v, output, log-sum-exp
            b.save("q", d), b.save("qkv", 3 * d), b.save("v", d), b.save("attn.out", d), b.save("lse", H, 4)
        elif b.flows("attn"):  # math attention: the T x T probabilities (and their dropout)
            b.save("q", d), b.save("k", d), b.save("v", d), b.save("probs", H * T)
            if setup.dropout and config.attn_pdrop > 0:
                b.save("probs.mask", H * T), b.save("probs.dropped", H * T)
        b.linear("attn.c_proj", "attn.out" if fused else "attn.merged", d)
        b.dropout("attn.resid_dropout", config.resid_pdrop, d)
        b.layer_norm("ln_2", "res", d)
        b.linear("mlp.c_fc", "ln_2.out", d)
        if b.flows("mlp.act"):
            b.save("act", ACT_SAVES[config.activation_function] * f)
        b.linear("mlp.c_proj", "act.out", f)
        b.dropout("mlp.dropout", config.resid_pdrop, d)

    ops = ["ln_1", "attn.c_attn", "attn", "attn.c_proj", "attn.resid_dropout", "ln_2", "mlp.c_fc", "mlp.act"]
    return {
        "embed": ("transformer", ["wte", "drop"], embed),
        "blocks": ("transformer.h", [*ops, "mlp.c_proj", "mlp.dropout"], block),
        "head": ("", ["transformer.ln_f", HEADS[setup.task]], lambda b: head(b, "transformer.ln_f", d)),
    }


def llama(config, setup) -> dict:
    d, f, H, T = config.hidden_size, config.intermediate_size, config.num_attention_heads, setup.seq_len
    d_kv = config.num_key_value_heads * getattr(config, "head_dim", d // H)

    def embed(b: Ledger) -> None:
        if b.trains("embed_tokens"):
            b.save("ids", 1, 8)

    def block(b: Ledger) -> None:
        b.rms_norm("input_layernorm", "x", d)
        for op in ("q_proj", "k_proj", "v_proj"):
            b.linear(f"self_attn.{op}", "ln_1.out", d)
        if b.flows("self_attn") and setup.attention == "fused":
            b.save("q", d), b.save("k", d_kv), b.save("v", d_kv), b.save("attn.out", d), b.save("lse", H, 4)
        elif b.flows("self_attn"):  # eager: keys and values repeated to every head, fp32 softmax
            b.save("q", d), b.save("k", d), b.save("v", d), b.save("probs.fp32", H * T, 4)
            if b.e != 4:
                b.save("probs", H * T)
        b.linear("self_attn.o_proj", "attn.out" if setup.attention == "fused" else "attn.merged", d)
        b.rms_norm("post_attention_layernorm", "res", d)
        b.linear("mlp.gate_proj", "ln_2.out", d), b.linear("mlp.up_proj", "ln_2.out", d)
        if b.flows("mlp.act_fn"):
            b.save("gate", f), b.save("silu", f), b.save("up", f)  # SwiGLU: silu(gate) * up
        b.linear("mlp.down_proj", "swiglu.out", f)

    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn", "self_attn.o_proj"]
    mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.act_fn", "mlp.down_proj"]
    return {
        "embed": ("model", ["embed_tokens"], embed),
        "blocks": ("model.layers", ["input_layernorm", *attn, "post_attention_layernorm", *mlp], block),
        "head": ("", ["model.norm", HEADS[setup.task]], lambda b: head(b, "model.norm", d, rms=True)),
    }


HEADS = {"causal_lm": "lm_head", "seq_cls": "score"}


def head(b: Ledger, norm: str, d: int, rms: bool = False) -> None:
    """Final norm, output layer and loss: a causal LM keeps the fp32 log-probabilities of every token."""
    (b.rms_norm if rms else b.layer_norm)(norm, "x", d)
    b.linear(b.order[-1], "norm.out", d)
    if b.order[-1] == "lm_head" and b.start < len(b.order):
        b.save("log_probs", b.config.vocab_size, 4), b.save("labels", 1, 8)


# The recipes by config.model_type (Mistral and Qwen2 blocks save what LLaMA's do).
ARCHITECTURES = {"gpt2": gpt2, "llama": llama, "mistral": llama, "qwen2": llama}


def activation_bytes(model: nn.Module, config, setup) -> int:
    """Peak bytes autograd holds for one training step of `model` (built, possibly on meta)."""
    parts = ARCHITECTURES[config.model_type](config, setup)
    (embed_root, embed_ops, embed), (blocks_root, block_ops, block) = parts["embed"], parts["blocks"]
    blocks = model.get_submodule(blocks_root)
    plan = [(model.get_submodule(embed_root), embed_ops, embed)]
    plan += [(blk, block_ops, block) for blk in blocks] + [(model, *parts["head"][1:])]
    # Gradient checkpointing makes the embeddings' output require grad (as transformers does).
    flowing, ledgers = False, []
    for part, ops, recipe in plan:
        probe = Ledger(part, ops, -1, config, setup)
        trained = [j for j, op in enumerate(ops) if probe.trains(op)] + ([0] if setup.gradient_checkpointing else [])
        start = -1 if flowing else min(trained, default=len(ops))
        ledger = Ledger(part, ops, start, config, setup)
        recipe(ledger)
        ledgers.append(ledger)
        flowing = flowing or start < len(ops)
    tokens = setup.batch_size * setup.seq_len
    embed_l, block_ls, head_l = ledgers[0], ledgers[1:-1], ledgers[-1]
    if not setup.gradient_checkpointing:
        return round(tokens * sum(lg.total() for lg in ledgers))
    # Kept: each block's input ("x"); at the peak one block is recomputed (or the head is alive).
    inputs = len(block_ls) * DTYPE_BYTES[setup.dtype] * config.hidden_size
    recomputed = max(lg.total() - lg.saved.get("x", 0) for lg in block_ls)
    return round(tokens * (embed_l.total() + inputs + max(head_l.total(), recomputed)))
