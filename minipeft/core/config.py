"""Config base class and the method registry.

Every method has a dataclass config (a subclass of `PeftConfig`) and registers a
`Method` that says how to inject it. `get_peft_model` looks the method up here; no
other code needs to know which methods exist. Taught in chapter 02.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from .architectures import role_pattern
from .targets import check_pattern, find_targets, matches_pattern

# peft writes these bookkeeping fields into adapter_config.json; we read past them.
_PEFT_BOOKKEEPING = {"auto_mapping", "revision", "peft_version", "base_model_name_or_path"}


@dataclass
class PeftConfig:
    """Fields every method shares. Subclasses add their own, each with a commented default."""

    peft_type: ClassVar[str] = ""
    # Names of modules to adapt: a list (exact name or dotted suffix), a regex string
    # (full match) or "all-linear". None picks the per-architecture default.
    target_modules: list[str] | str | None = None
    # Modules trained in full and saved with the adapter (e.g. a new classification head).
    modules_to_save: list[str] | None = None
    # Recorded for the reader and for peft; minipeft never downloads it.
    base_model_name_or_path: str | None = None
    # "SEQ_CLS", "CAUSAL_LM", ... as in peft; informative only.
    task_type: str | None = None
    # True when loaded for inference: nothing is made trainable.
    inference_mode: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            check_pattern(self.target_modules, f"{type(self).__name__}.target_modules")

    def for_module(self, module_name: str) -> PeftConfig:
        """The config one target module's adapter is built from (`module_name`: its path in the model).
        The same for every module, unless a method lets settings vary per module (`RankPatterns`)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with peft's `peft_type` key so peft can read it."""
        out = dataclasses.asdict(self)
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the registered config class named by `data["peft_type"]`."""
        peft_type = data.get("peft_type")
        if peft_type not in REGISTRY:
            raise ValueError(f"adapter config has peft_type={peft_type!r}; minipeft knows {sorted(REGISTRY)}")
        config_cls = REGISTRY[peft_type].config_cls
        names = {f.name for f in dataclasses.fields(config_cls)}
        ignored = {
            k: v
            for k, v in data.items()
            if k not in names
            and k != "peft_type"
            and k not in _PEFT_BOOKKEEPING
            and v not in (None, False, [], {}, "none")
        }
        if ignored:
            warnings.warn(
                f"{config_cls.__name__}: ignoring fields minipeft does not implement: {ignored}", stacklevel=2
            )
        return config_cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RankPatterns(PeftConfig):
    """peft's `rank_pattern` / `alpha_pattern` for methods with a rank and an alpha (LoRA, LoHa, LoKr):
    other values for the modules whose names a key matches. A key is a regex that must match the end
    of the module's path at a dot boundary; the first key that matches wins, as in peft."""

    rank_field: ClassVar[str] = "r"
    alpha_field: ClassVar[str] = "alpha"
    # {module name or regex: rank} for the modules that take another rank than `r`; {}: none.
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    # {module name or regex: alpha} for the modules that take another alpha; {}: none.
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        for field, patterns, ok, expected in (
            ("rank_pattern", self.rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
             "positive integers"),
            ("alpha_pattern", self.alpha_pattern,
             lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "finite numbers"),
        ):  # fmt: skip
            for key, value in patterns.items():
                if not isinstance(key, str):
                    raise TypeError(f"{cls}.{field} keys are module names or regexes, got {key!r}")
                check_pattern(key, f"{cls}.{field} key")
                if not ok(value):
                    raise ValueError(f"{cls}.{field}[{key!r}] must be one of the {expected}, got {value!r}")

    def for_module(self, module_name: str) -> PeftConfig:
        values = {}
        for field, name in ((self.rank_field, "rank_pattern"), (self.alpha_field, "alpha_pattern")):
            patterns = getattr(self, name)
            key = next((k for k in patterns if matches_pattern(rf"(.*\.)?({k})", module_name, name)), None)
            if key is not None:
                values[field] = patterns[key]
        return dataclasses.replace(self, **values, rank_pattern={}, alpha_pattern={}) if values else self


def require(config: Any, field: str, ok: bool, expected: str) -> None:
    """Refuse a value out of its field's range when the config is made: `ok` is the range check."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{field} must be {expected}, got {getattr(config, field)!r}")


def _matches(value: Any, annotation: Any) -> bool:
    """True if `value` fits a (simple) type annotation: builtins, unions, list[...], Literal."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1]
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_field_types(config: Any) -> None:
    """Raise TypeError naming the field, the value given and the type expected; ValueError for a number
    that is NaN or infinite (it would reach a forward pass as NaN)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise TypeError(
                f"{type(config).__name__}.{f.name} must be {hints[f.name]}, got {value!r} ({type(value).__name__})"
            )
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{type(config).__name__}.{f.name} must be a finite number, got {value!r}")


@dataclass
class Method:
    """How one PEFT method plugs in (ARCHITECTURE.md): its config class, its layer class, and the
    roles (core/architectures.py) it adapts when `target_modules` is None.

    `core.inject.inject_adapter` runs the same steps for every method: `resolve` the config
    against the model, find the `targets`, wrap each in `layer_cls` (once) and call its
    `add_adapter(name, config)`, then `link` the layers. A method overrides a hook only for
    what it does differently; none rewrites the loop.
    """

    config_cls: type[PeftConfig]
    layer_cls: type[nn.Module] | None  # None for a hybrid, whose `parts` bring their own layers
    default_roles: tuple[str, ...] = ()

    def resolve(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """The config this adapter is built from on `model`: the caller's config, or a copy with what
        depends on the model filled in (sizes, budgets), checked before anything changes. Never mutates."""
        return config

    def targets(self, model: nn.Module, config: PeftConfig) -> list[str]:
        """Names of the modules to wrap: `target_modules`, or the modules of this method's default roles.
        "all-linear" leaves out the output head and the modules trained in full (`modules_to_save`), as in peft."""
        names = find_targets(model, config.target_modules, role_pattern(model, self.default_roles))
        if config.target_modules == "all-linear" and config.modules_to_save:
            full = set(find_targets(model, config.modules_to_save))
            names = [n for n in names if n not in full]
        return names

    def parts(self, config: PeftConfig) -> list[PeftConfig] | None:
        """A hybrid method (chapter 08) is made of other methods: the configs of its parts, each injected
        under the same adapter name by its own method. None (the default): the method wraps layers itself."""
        return None

    def depends_on(self, config: PeftConfig) -> list[str]:
        """Names of other adapters this adapter is built on (AdapterFusion's fused adapters, chapter 08):
        `PeftModel.delete_adapter` refuses to delete them while it exists. Default: none."""
        return []

    def to_file(self, model: nn.Module, adapter_name: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the adapter's file holds, given its tensors under their file keys (`model`: the model with its
        adapters). Default: those tensors. A method that peft stores in another form writes peft's form."""
        return tensors

    def from_file(
        self, model: nn.Module, config: PeftConfig, tensors: dict[str, Tensor]
    ) -> tuple[PeftConfig, dict[str, Tensor]]:
        """The inverse of `to_file`, for minipeft's files and peft's: the config to build and the tensors to
        load under their file keys. `model`: the model the adapter is loaded into. Default: as they are."""
        return config, tensors

    def link(self, model: nn.Module, config: PeftConfig, adapter_name: str, layers: dict[str, nn.Module]) -> None:
        """After every target got its adapter: build what spans layers (a shared vector, a global budget,
        which layers play which role). `layers` maps each target's name to its wrapper. Default: nothing."""

    def prepare_inputs(
        self, peft_model: nn.Module, kwargs: dict[str, Any], adapter_name: str, generating: bool = False
    ) -> dict[str, Any]:
        """Rewrite the keyword inputs of `PeftModel.forward` / `.generate` for the active adapter
        `adapter_name` before the base model sees them. Methods that wrap layers change nothing;
        prompt methods (chapter 04) prepend virtual tokens or pass key/value prefixes here. A hybrid
        lets each of its parts rewrite them in turn."""
        for part in self.parts(peft_model.peft_config[adapter_name]) or []:
            kwargs = REGISTRY[part.peft_type].prepare_inputs(peft_model, kwargs, adapter_name, generating)
        return kwargs


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry under its config's `peft_type`."""
    REGISTRY[method.config_cls.peft_type] = method
    return method
