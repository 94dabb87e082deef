"""Which modules does a config target? Names, dotted suffixes, regexes, "all-linear".

Taught in chapter 02. The rules follow HF peft so readers carry them over:

- a list: a module matches if its full name equals an entry or ends with "." + entry;
- a string: a regular expression that must match the full module name (matched with a time bound:
  a pattern may come from a downloaded adapter_config.json, and one must not hang a load);
- "all-linear": every linear layer (nn.Linear or GPT-2's Conv1D) except the output head.
"""

from __future__ import annotations

import regex
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import model_type
from .wrapper import AdapterWrapper

LINEAR_TYPES = (nn.Linear, Conv1D)
# Longest a pattern may take to match one module name (ordinary patterns take microseconds).
REGEX_SECONDS = 1.0


def check_pattern(pattern: str, field: str) -> None:
    """Refuse a pattern that is not a regular expression, naming the config field it came from."""
    try:
        regex.compile(pattern)
    except regex.error as error:
        raise ValueError(f"{field}={pattern!r} is not a valid regular expression: {error}") from None


def matches_pattern(pattern: str, name: str, field: str) -> bool:
    """`pattern` matches all of `name`, within REGEX_SECONDS."""
    check_pattern(pattern, field)
    try:
        return regex.fullmatch(pattern, name, timeout=REGEX_SECONDS) is not None
    except TimeoutError:
        raise ValueError(
            f"{field}={pattern!r} took over {REGEX_SECONDS} s to match the module name {name!r} "
            "(catastrophic backtracking); use a list of names or a simpler pattern"
        ) from None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D (GPT-2 stores its weight as (in, out)), or a module that
    declares itself a linear layer stored in another form (`is_linear_layer = True`, with
    `in_features`, `out_features`, a read-only `weight` (out, in) and `add_to_weight(delta)`:
    the 4-bit base of chapter 09)."""
    return isinstance(module, LINEAR_TYPES) or getattr(module, "is_linear_layer", False) is True


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): the module returned by get_output_embeddings()."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def _matches(name: str, target: list[str] | str) -> bool:
    if isinstance(target, str):
        return matches_pattern(target, name, "target_modules")
    return any(name == t or name.endswith("." + t) for t in target)


def find_targets(model: nn.Module, target: list[str] | str | None, default: list[str] | str | None = None) -> list[str]:
    """Return the names of the modules to adapt (`default` when target is None: a method's default
    targets for this architecture), or raise a ValueError that lists what exists."""
    if target is None:
        if default is None:
            raise ValueError(
                f"target_modules=None but minipeft has no default targets for model_type={model_type(model)!r} "
                f"(core/architectures.py lists the known families); pass target_modules, e.g. "
                f"{sorted(n for n, m in model.named_modules() if is_linear(m))[:6]}"
            )
        target = default
    inner = _inside_wrappers(model)
    modules = [(n, m) for n, m in model.named_modules() if n and n not in inner]
    if target == "all-linear":
        heads = _output_head_names(model)
        found = [n for n, m in modules if is_linear(m) and n not in heads]
    else:
        found = [n for n, _ in modules if _matches(n, target)]
    if not found:
        leaves = sorted({n.split(".")[-1] for n, _ in modules})
        raise ValueError(
            f"target_modules={target!r} matches no module of {type(model).__name__}. "
            f"Module names that exist (last component): {leaves}"
        )
    return found


def _inside_wrappers(model: nn.Module) -> set[str]:
    """Names of modules inside an adapter wrapper (its base layer, its adapters): never targets.

    The wrapper itself stays a target, so a wrapped layer can be wrapped again (methods compose).
    """
    wrappers = [n for n, m in model.named_modules() if isinstance(m, AdapterWrapper)]
    return {n for n, _ in model.named_modules() if any(n.startswith(w + ".") for w in wrappers)}
