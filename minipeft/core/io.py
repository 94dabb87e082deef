"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, as HF peft writes them.

Writes are atomic and the two files are one unit (temp files, then renames; the weights
record their config's hash), so an interrupted save never leaves a half-written adapter.
Reads accept safetensors only: nothing is ever unpickled.
Taught in chapter 02.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# File keys start with the path of the base model inside peft's PeftModel (peft's layout).
PREFIX = "base_model.model."


# The weights file records a hash of the config it was saved with, and the previous weights are kept under
# this name until the new config is in place: a save cut short at any point leaves a folder that loads
# either the old pair or the new one, never new weights with an old config.
PREVIOUS_WEIGHTS = ".previous." + WEIGHTS_NAME
CONFIG_HASH = "minipeft_config_sha256"


def _temporary(directory: Path, name: str, write) -> Path:
    """A new file in `directory` written by write(path); removed again if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def save_adapter(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter's config and tensors into `directory`, as one unit (see PREVIOUS_WEIGHTS)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    metadata = {"format": "pt", CONFIG_HASH: hashlib.sha256(text.encode()).hexdigest()}
    new_config = _temporary(directory, CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    try:
        new_weights = _temporary(directory, WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except BaseException:
        new_config.unlink(missing_ok=True)
        raise
    weights, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS
    try:
        previous.unlink(missing_ok=True)
        if weights.exists():
            os.link(weights, previous)  # the old weights stay reachable until the new config is in place
        os.replace(new_weights, weights)
        os.replace(new_config, directory / CONFIG_NAME)
    finally:
        new_weights.unlink(missing_ok=True)
        new_config.unlink(missing_ok=True)
    previous.unlink(missing_ok=True)


def _weights_for(directory: Path, config_text: str) -> Path:
    """The weights file saved with this config: the current one, or the previous one if a save was cut
    short between its two renames. Files without a recorded hash (written by peft) are taken as they are;
    so is a config edited by hand after saving (with a warning: it no longer is the one saved)."""
    digest = hashlib.sha256(config_text.encode()).hexdigest()
    weights, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS
    for path in (weights, previous):
        if path.is_file():
            with safe_open(path, "pt") as f:
                recorded = (f.metadata() or {}).get(CONFIG_HASH)
            if recorded in (None, digest):
                return path
    warnings.warn(f"{directory}: {CONFIG_NAME} changed after {WEIGHTS_NAME} was saved; loading them together",
                  stacklevel=3)  # fmt: skip
    return weights


def load_adapter_files(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read one adapter's config dict and tensors, with errors that say what is wrong."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            found = sorted(x.name for x in directory.iterdir()) if directory.is_dir() else "no such directory"
            raise FileNotFoundError(
                f"{p} not found; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} (found: {found})"
            )
    try:
        text = config_path.read_text()
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); re-save the adapter") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object of config fields, got {type(config).__name__}")
    try:
        weights_path = _weights_for(directory, text)
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{weights_path} is not a readable safetensors file ({e}); it may be truncated or in another format. "
            "minipeft reads safetensors only (never pickle): re-save the adapter with save_pretrained()"
        ) from e
    return config, tensors
