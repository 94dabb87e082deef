"""One table of what the methods need to know about each model family (`config.model_type`).

A method never names a model's modules itself. It names *roles* ("q", "v", "ffn_out", ...)
and this table says, per architecture, which modules play them (regular expressions over full
module names, as `target_modules` accepts). With `target_modules=None`, a method's default
targets are the modules of its roles: LoRA adapts "q" and "v" (Hu et al., 2022), (IA)^3 "k",
"v" and "ffn_out" (Liu et al., 2022), a Houlsby adapter sits after "attn_out" and "ffn_out".
To support a new family, add one entry here (ARCHITECTURE.md, "A new architecture").
Taught in chapter 02.
"""

from __future__ import annotations

from torch import nn

# Roles, shared by every family:
#   q, k, v    attention's query/key/value projections (GPT-2 fuses all three into c_attn)
#   attn_out   attention's output projection
#   ffn_in     the feed-forward sublayer's first projection(s) (LLaMA: gate and up)
#   ffn_out    the feed-forward sublayer's last projection (its *input* is what (IA)^3 rescales)
#   ffn        the whole feed-forward sublayer (a parallel adapter sits beside it)
#   linear     every linear layer of the blocks (intrinsic dimension, sparse masks)
_LLAMA_LIKE = {
    "q": r".*\.self_attn\.q_proj",
    "k": r".*\.self_attn\.k_proj",
    "v": r".*\.self_attn\.v_proj",
    "attn_out": r".*\.self_attn\.o_proj",
    "ffn_in": r".*\.mlp\.(gate|up)_proj",
    "ffn_out": r".*\.mlp\.down_proj",
    "ffn": r"(?:.*\.)?layers\.\d+\.mlp",
}


_BERT_LIKE = {
    "q": r".*\.attention\.self\.query",
    "k": r".*\.attention\.self\.key",
    "v": r".*\.attention\.self\.value",
    "attn_out": r".*\.attention\.output\.dense",
    "ffn_in": r".*\.intermediate\.dense",
    "ffn_out": r".*layer\.\d+\.output\.dense",
    # BERT's FFN is split (`intermediate`, `output`); `output(h, x)` adds the FFN input x back itself:
    # the parallel adapter wraps it.
    "ffn": r".*layer\.\d+\.output",
}


ARCHITECTURES: dict[str, dict[str, str]] = {
    "gpt2": {
        "q": r".*\.attn\.c_attn",
        "k": r".*\.attn\.c_attn",
        "v": r".*\.attn\.c_attn",
        "attn_out": r".*\.attn\.c_proj",
        "ffn_in": r".*\.mlp\.c_fc",
        "ffn_out": r".*\.mlp\.c_proj",
        "ffn": r"(?:.*\.)?h\.\d+\.mlp",
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "vit": {  # transformers 5 names: layers.N.attention.{q,k,v,o}_proj, layers.N.mlp.{fc1,fc2}
        "q": r".*\.attention\.q_proj",
        "k": r".*\.attention\.k_proj",
        "v": r".*\.attention\.v_proj",
        "attn_out": r".*\.attention\.o_proj",
        "ffn_in": r".*\.mlp\.fc1",
        "ffn_out": r".*\.mlp\.fc2",
        "ffn": r"(?:.*\.)?layers\.\d+\.mlp",
    },
}
for _roles in ARCHITECTURES.values():
    _roles.setdefault("linear", "|".join(f"(?:{_roles[r]})" for r in ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")))


def model_type(model: nn.Module) -> str | None:
    """`model.config.model_type` of a transformers model ("gpt2", "llama", ...), None for other modules."""
    return getattr(getattr(model, "config", None), "model_type", None)


def role_pattern(model: nn.Module, roles: tuple[str, ...]) -> str | None:
    """One regex (full match) for the modules that play `roles` in this model; None if its family is unknown."""
    table = ARCHITECTURES.get(model_type(model))
    if table is None or not roles:
        return None
    patterns = dict.fromkeys(table[r] for r in roles)  # GPT-2's q, k and v are one module: once
    return "|".join(f"(?:{p})" for p in patterns)


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers model, read from its config; LLaMA-style
    grouped-query attention has fewer key/value heads than query heads."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, heads, head_dim
