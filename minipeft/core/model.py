"""`PeftModel`: the wrapper every method returns, with HF peft's API.

Parameter names mirror peft (`base_model.model.<module>.lora_A.<adapter>.weight`), so
the adapter file written here loads in peft and the other way round. Taught in chapter 02.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import REGISTRY, PeftConfig
from .inject import adapter_parameters, inject_adapter, replace_module, set_active, set_trainable, upcast_adapter
from .io import PREFIX, load_adapter_files, save_adapter
from .layers import ModulesToSaveWrapper, TunerLayer
from .wrapper import AdapterWrapper

# peft_type -> how to combine trained adapters of that method into a new one (`add_weighted_adapter`);
# filled by the package that implements it (LoRA: minipeft.hybrid.merging), so core imports no method.
WEIGHTED_COMBINERS: dict = {}
BASE_ROW = "__base__"  # in a mixed batch, the rows that run the base model alone (peft's name)


def check_adapter_name(name: object) -> None:
    """An adapter name becomes a key part and a folder name: refuse what could break either."""
    bad = (
        not isinstance(name, str) or not name or name == BASE_ROW or "." in name or "/" in name or "\\" in name
        or name.strip() != name
    )  # fmt: skip
    if bad:
        raise ValueError(
            f"adapter name {name!r} is not allowed: use a non-empty string without '.', '/', '\\' or surrounding "
            f"spaces, other than {BASE_ROW!r} (it names the folder the adapter is saved in)"
        )


class TunerModel(nn.Module):
    """Holds the adapted model as `.model` (peft's `base_model.model` prefix)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with one or more named adapters, of any methods; `get_peft_model` builds it.

    Several adapters can be active at once (`set_adapter(["a", "b"])`): each wrapped layer applies its
    active adapters in the order of `active_adapters`, each to the output of the one before (a layer
    wrapped twice applies the inner wrapper's adapters first), and each active prompt-style adapter
    rewrites the inputs in that order. All active adapters train."""

    def __init__(
        self,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str = "default",
        _fill=None,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        if any(isinstance(m, AdapterWrapper) for m in model.modules()):
            raise ValueError(
                f"{type(model).__name__} already carries adapters (it was given to get_peft_model before); "
                "add more with peft_model.add_adapter(name, config), or start from a fresh base model"
            )
        self.base_model = TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.unloaded = False  # True after merge_and_unload()/unload(): the wrappers are gone
        self.add_adapter(adapter_name, config, _fill, autocast_adapter_dtype)

    @property
    def active_adapter(self) -> str:
        """The active adapter's name (the first one, when several are active)."""
        return self.active_adapters[0]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """`adapter_names`: mixed-batch inference, one adapter per row ("__base__": none), as in HF peft."""
        kwargs = self._prepare_inputs(kwargs)
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed_batch(adapter_names, [*args, *kwargs.values()]):
            return self.base_model(*args, **kwargs)

    def _prepare_inputs(self, kwargs: dict, generating: bool = False) -> dict:
        """Let each active adapter's method rewrite the inputs in turn (prompt methods add virtual tokens)."""
        for name in self.active_adapters:
            kwargs = REGISTRY[self.peft_config[name].peft_type].prepare_inputs(self, kwargs, name, generating)
        return kwargs

    def generate(
        self, input_ids: torch.Tensor | None = None, adapter_names: list[str] | None = None, **kwargs
    ) -> torch.Tensor:
        """The base model's `generate` with the active adapters. Leading columns a method added to
        `input_ids` (virtual tokens) are dropped from the result, which starts with the caller's ids.
        `adapter_names`: one adapter per row ("__base__": none), as in `forward`; with beams or several
        sequences per row, each row's copies keep its adapter (peft does the same)."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        n_in = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else None
        kwargs = self._prepare_inputs(kwargs, generating=True)
        if adapter_names is None:
            out = self.base_model.model.generate(**kwargs)
        else:
            with self._mixed_batch(adapter_names, list(kwargs.values()), copies=self._copies_per_row(kwargs)):
                out = self.base_model.model.generate(**kwargs)
        if n_in is None or not isinstance(out, torch.Tensor):
            return out
        return out[:, kwargs["input_ids"].shape[1] - n_in :]

    # -- adapters -------------------------------------------------------------------
    def add_adapter(
        self, adapter_name: str, config: PeftConfig, _fill=None, autocast_adapter_dtype: bool = True
    ) -> None:
        """Inject a new named adapter; the active adapters do not change (except for the first adapter).
        The config stored in `peft_config` is the one resolved against this model; the caller's is untouched.
        `autocast_adapter_dtype`: on a float16/bfloat16 base the adapter's tensors are float32 (peft's default).
        (`_fill(self, adapter_name)`: loads the tensors, inside the all-or-nothing injection.)"""
        if not isinstance(config, PeftConfig) or config.peft_type not in REGISTRY:
            raise TypeError(f"expected a minipeft config ({sorted(REGISTRY)}), got {type(config).__name__}")
        check_adapter_name(adapter_name)
        if self.unloaded:
            raise ValueError("this PeftModel was unloaded (merge_and_unload/unload): wrap the base model again")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already: {sorted(self.peft_config)}")

        def fill() -> None:
            if autocast_adapter_dtype:
                upcast_adapter(self.base_model.model, adapter_name)
            if _fill is not None:
                _fill(self, adapter_name)

        self.peft_config[adapter_name] = inject_adapter(self.base_model.model, config, adapter_name, fill)
        self.set_adapter(self.active_adapters)  # the new adapter's wrappers learn which adapters run

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make one adapter, or several (a list, applied in its order), the ones that run and train."""
        names = self._check_names([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        if self._merged() and self._merged() != sorted(names):
            warnings.warn(f"set_adapter(): unmerging {self._merged()} first (as peft does)", stacklevel=2)
            self.unmerge_adapter()
        self.active_adapters = names
        set_active(self.base_model.model, names)
        set_trainable(self.base_model.model, [n for n in names if not self.peft_config[n].inference_mode])

    def _check_names(self, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r}; this model has {sorted(self.peft_config)}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"expected one adapter name or a list of distinct names, got {names!r}")
        return names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and all its state. A merged one is unmerged first; deleting an active one makes
        the remaining active adapters (or else the first remaining adapter) active, as in peft."""
        self._check_names([adapter_name])
        users = [n for n, c in self.peft_config.items() if adapter_name in REGISTRY[c.peft_type].depends_on(c)]
        if users:
            raise ValueError(f"adapter {adapter_name!r} is used by {users}, built on it: delete {users} first")
        if len(self.peft_config) == 1:
            raise ValueError(f"{adapter_name!r} is this model's only adapter; unload() returns the plain base model")
        for layer in self._tuner_layers():
            if adapter_name in layer.merged_adapters:
                others = [n for n in layer.merged_adapters if n != adapter_name]
                layer.unmerge()
                layer.merge(others)
        if adapter_name in self.active_adapters:
            remaining = [n for n in self.active_adapters if n != adapter_name]
            remaining = remaining or [next(n for n in self.peft_config if n != adapter_name)]
            warnings.warn(f"deleting the active adapter {adapter_name!r}; now active: {remaining}", stacklevel=2)
            self.set_adapter(remaining)
        for module in self._wrappers():
            if adapter_name in module.adapter_names():
                module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]

    def _wrappers(self) -> Iterator[AdapterWrapper]:
        return (m for m in self.base_model.model.modules() if isinstance(m, AdapterWrapper))

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd", **options
    ) -> None:
        """Add `adapter_name`, a weighted combination of trained adapters of one method, as in peft; the
        combination types and options are those of the method's entry in WEIGHTED_COMBINERS."""
        names = list(adapters) if isinstance(adapters, (list, tuple)) else []
        kinds = sorted({self.peft_config[a].peft_type for a in names if a in self.peft_config})
        combine = WEIGHTED_COMBINERS.get(kinds[0]) if len(kinds) == 1 else None
        if combine is None:
            raise ValueError(
                f"add_weighted_adapter combines adapters of one method among {sorted(WEIGHTED_COMBINERS)}; got "
                f"{adapters!r}, adapters of {kinds or 'none'} (this model has {sorted(self.peft_config)})"
            )
        combine(self, adapters, weights, adapter_name, combination_type, **options)

    # -- accounting -------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, counted as peft counts them."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        # A linear stored in 4 bits (chapter 09) keeps its weight in buffers: count the weights it encodes.
        packed = sum(m.in_features * m.out_features for m in self.modules() if getattr(m, "is_linear_layer", False))
        return trainable, sum(p.numel() for p in self.parameters()) + packed

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- merge ------------------------------------------------------------------------
    def _tuner_layers(self) -> list[TunerLayer]:
        return [m for m in self._wrappers() if isinstance(m, TunerLayer)]

    def _merged(self) -> list[str]:
        return sorted({n for layer in self._tuner_layers() for n in layer.merged_adapters})

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the named adapters (default: the active ones) into the base weights: forward then costs
        nothing extra. One already merged is skipped with a warning (merging it again would add its update
        twice), as in peft. `safe_merge=True` first checks every update for NaN or inf and refuses the whole
        merge, writing nothing, if one is not finite."""
        names = self._check_names(adapter_names or self.active_adapters)
        again = sorted(set(names) & set(self._merged()))
        if again:
            warnings.warn(f"adapters {again} are already merged; they are not merged again", stacklevel=2)
        layers = self._tuner_layers()
        if safe_merge:
            bad = [n for layer in layers for n in names if n in layer.adapter_names() and not layer.finite_update(n)]
            if bad:
                raise ValueError(f"safe_merge: adapter {bad[0]!r} has a non-finite update (NaN or inf); nothing merged")
        for layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        for layer in self._tuner_layers():
            layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Merge the named (default: active) adapters and return the plain base model, wrappers removed."""
        self.merge_adapter(adapter_names, safe_merge)
        return self._unwrap()

    def unload(self) -> nn.Module:
        """The plain base model, wrappers removed and nothing merged (merged adapters are taken out first)."""
        self.unmerge_adapter()
        return self._unwrap(keep_copies=False)

    def _unwrap(self, keep_copies: bool = True) -> nn.Module:
        model = self.base_model.model
        for name, module in reversed(list(model.named_modules())):  # innermost first: twice-wrapped modules end plain
            if isinstance(module, TunerLayer):
                replace_module(model, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                active = [n for n in module.active_adapters if n in module.modules_to_save] if keep_copies else []
                replace_module(model, name, module.modules_to_save[active[0]] if active else module.original_module)
        self.unloaded = True
        return model

    @contextmanager
    def disable_adapter(self):
        """Inside the block the model computes exactly its base outputs. Merged adapters are unmerged first
        (with a warning; they stay unmerged after, as in peft); nested blocks restore the outer state."""
        if self._merged():
            warnings.warn(f"disable_adapter(): unmerging {self._merged()} first", stacklevel=3)
            self.unmerge_adapter()
        wrappers = list(self._wrappers())
        before = [m.disabled for m in wrappers]
        for m in wrappers:
            m.disabled = True
        try:
            yield
        finally:
            for m, state in zip(wrappers, before, strict=True):
                m.disabled = state

    def _copies_per_row(self, kwargs: dict) -> int:
        """How many rows generate() makes of each input row (beams, sequences per prompt)."""
        config = kwargs.get("generation_config") or self.base_model.model.generation_config
        beams = kwargs.get("num_beams", config.num_beams) or 1
        return max(beams, kwargs.get("num_return_sequences", config.num_return_sequences) or 1)

    @contextmanager
    def _mixed_batch(self, adapter_names: list[str], inputs: list, copies: int = 1) -> Iterator[None]:
        """Inside the block, row i of the batch runs through adapter adapter_names[i] in every wrapper
        (with `copies` > 1, rows i * copies ... (i + 1) * copies - 1 of what the model sees do)."""
        rows = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor)), None)
        if not isinstance(adapter_names, (list, tuple)) or rows != len(adapter_names):
            raise ValueError(
                f"adapter_names must be a list with one adapter name per row of the batch ({rows} rows), "
                f"'{BASE_ROW}' for the base model; got {adapter_names!r}"
            )
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ROW})
        if unknown:
            raise ValueError(f"adapter_names: no adapters named {unknown}; this model has {sorted(self.peft_config)}")
        if self.training:
            raise ValueError("adapter_names= is for inference (one optimizer cannot train a mixed batch); call .eval()")
        if any(m.merged_adapters for m in self._tuner_layers()):
            raise ValueError("adapter_names= needs unmerged adapters (a merged one acts on every row); unmerge first")
        wrappers = list(self._wrappers())
        for m in wrappers:
            m.row_adapters = [name for name in adapter_names for _ in range(copies)]
        try:
            yield
        finally:
            for m in wrappers:
                m.row_adapters = None

    # -- save / load ------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's file keys (nothing of the base model)."""
        name = adapter_name or self.active_adapter
        return {PREFIX + k: p for k, p in adapter_parameters(self.base_model.model, name, buffers=True).items()}

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as peft does: "default" at the top, others in a sub-directory."""
        if self.unloaded:
            raise ValueError(
                "this PeftModel was unloaded (merge_and_unload/unload) and holds no adapter any more; saving it "
                "would overwrite a good adapter with an empty one. Save before unloading"
            )
        for name in self._check_names(selected_adapters or list(self.peft_config)):
            directory = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = self.peft_config[name]
            tensors = REGISTRY[config.peft_type].to_file(self.base_model.model, name, self.adapter_state_dict(name))
            save_adapter(directory, config.to_dict(), tensors)

    def load_adapter(
        self,
        path: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add an adapter read from `path` under `adapter_name`."""
        config, tensors = read_adapter(self.base_model.model, path, is_trainable)
        self.add_adapter(adapter_name, config, tensor_loader(tensors, path), autocast_adapter_dtype)

    def load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], path) -> None:
        """Copy a file's tensors into the adapter, after checking that keys and shapes all fit."""
        params = self.adapter_state_dict(adapter_name)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"adapter file in {path} does not fit this model: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}; was it saved from another architecture, config or base shape?"
            )
        for key, param in params.items():
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"adapter file in {path}: {key} has shape {tuple(tensors[key].shape)} but this model "
                    f"expects {tuple(param.shape)}; the adapter was saved from a base of another shape"
                )
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key])

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> PeftModel:
        """Wrap `model` and load the adapter saved in `path` (by minipeft or by HF peft). For inference
        (is_trainable=False) the model comes back in eval() mode with nothing trainable, as in peft.
        If the file does not fit, `model` is left exactly as it was."""
        config, tensors = read_adapter(model, path, is_trainable)
        peft_model = cls(model, config, adapter_name, tensor_loader(tensors, path), autocast_adapter_dtype)
        return peft_model if is_trainable else peft_model.eval()


def read_adapter(model: nn.Module, path, is_trainable: bool) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors, in the form this model's method builds and loads."""
    config_dict, tensors = load_adapter_files(path)
    config = PeftConfig.from_dict({**config_dict, "inference_mode": not is_trainable})
    return REGISTRY[config.peft_type].from_file(model, config, tensors)


def tensor_loader(tensors: dict[str, torch.Tensor], path) -> Callable[[PeftModel, str], None]:
    """The `_fill` of `add_adapter` that loads a file's tensors into the new adapter."""
    return lambda peft_model, adapter_name: peft_model.load_tensors(adapter_name, tensors, path)


def get_peft_model(
    model: nn.Module,
    config: PeftConfig,
    adapter_name: str = "default",
    quantization=None,
    autocast_adapter_dtype: bool = True,
) -> PeftModel:
    """Wrap `model` with the method `config` describes; the only entry point.

    `quantization` (e.g. `mp.NF4Config()`) first stores the targeted base linears in 4 bits
    through its `quantize(model, config)`: LoRA on top of that is QLoRA (chapter 09).
    `autocast_adapter_dtype` (peft's default, True): on a float16/bfloat16 base the adapter is float32."""
    if quantization is not None:
        quantization.quantize(model, config)
    return PeftModel(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
