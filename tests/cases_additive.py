"""The additive family in the shared property suite (chapters 03-05), with closed-form
counts written from the architectures' configs, not from minipeft's modules:

- bottleneck adapter, d -> m -> d with biases: 2 d m + m + d per site; Houlsby has two
  sites per block (attention and FFN), the parallel adapter one (beside the FFN);
- prompt tuning: n d; P-tuning: n d plus its encoder; prefix tuning: n d_kv plus its MLP;
- (IA)^3: one number per key and value output and per FFN intermediate unit.
"""

from __future__ import annotations

import minipeft as mp
from tests.cases import Case

N_VIRTUAL = 5  # virtual tokens for the prompt methods
BOTTLENECK = 8  # m for the adapters
HIDDEN = 16  # encoder width h of P-tuning and prefix tuning


def dims(base) -> dict[str, int]:
    """L, d, d_kv (all key/value heads), d_ff of a tiny model, from its config."""
    c = base.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d_ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
    return dict(
        L=c.num_hidden_layers, d=c.hidden_size, d_kv=heads * (c.hidden_size // c.num_attention_heads), d_ff=d_ff
    )


def bottleneck_count(d: int, m: int) -> int:
    return 2 * d * m + m + d


def lstm_count(d_in: int, h: int, layers: int) -> int:
    """Bidirectional LSTM: per direction and layer 4h(d_in + h) weights and 8h biases; layers > 1 read 2h."""
    return sum(2 * (4 * h * ((d_in if i == 0 else 2 * h) + h) + 8 * h) for i in range(layers))


def ia3_count(kind: str, base) -> int:
    g = dims(base)
    # GPT-2's fused c_attn rescales q, k and v (3d); elsewhere keys and values (2 d_kv); plus d_ff.
    attention = 3 * g["d"] if kind == "gpt2" else 2 * g["d_kv"]
    return g["L"] * (attention + g["d_ff"])


def ptuning_count(base, cfg) -> int:
    d, h, n = dims(base)["d"], cfg.encoder_hidden_size, cfg.num_virtual_tokens
    head = (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    return n * d + lstm_count(d, h, cfg.encoder_num_layers) + head


def prefix_count(base, cfg) -> int:
    g, h, n = dims(base), cfg.encoder_hidden_size, cfg.num_virtual_tokens
    out = g["L"] * 2 * g["d_kv"]
    return n * g["d_kv"] + (g["d_kv"] * h + h) + (h * out + out)


CASES = {
    "ADAPTER": Case(
        config=lambda kind, identity: mp.AdapterConfig(
            placement="houlsby", bottleneck_size=BOTTLENECK, init_weights=identity
        ),
        closed_form=lambda base, names, cfg: 2 * dims(base)["L"] * bottleneck_count(dims(base)["d"], BOTTLENECK),
        mergeable=False,
    ),
    "PARALLEL_ADAPTER": Case(
        config=lambda kind, identity: mp.ParallelAdapterConfig(bottleneck_size=BOTTLENECK, init_weights=identity),
        closed_form=lambda base, names, cfg: dims(base)["L"] * bottleneck_count(dims(base)["d"], BOTTLENECK),
        mergeable=False,
    ),
    "IA3": Case(
        config=lambda kind, identity: mp.IA3Config(init_ia3_weights=identity),
        closed_form=lambda base, names, cfg: ia3_count(base.config.model_type, base),
    ),
    "PROMPT_TUNING": Case(
        config=lambda kind, identity: mp.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL),
        closed_form=lambda base, names, cfg: N_VIRTUAL * dims(base)["d"],
        mergeable=False,
        identity_at_init=False,
    ),
    "P_TUNING": Case(
        config=lambda kind, identity: mp.PTuningConfig(
            num_virtual_tokens=N_VIRTUAL, encoder_reparameterization_type="LSTM", encoder_hidden_size=HIDDEN
        ),
        closed_form=lambda base, names, cfg: ptuning_count(base, cfg),
        mergeable=False,
        identity_at_init=False,
    ),
    "PREFIX_TUNING": Case(
        config=lambda kind, identity: mp.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=HIDDEN),
        closed_form=lambda base, names, cfg: prefix_count(base, cfg),
        mergeable=False,
        identity_at_init=False,
    ),
}
