"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, as HF peft writes them.

Writes are atomic (temp file, then rename), so an interrupted save never leaves a
half-written adapter. Reads accept safetensors only: nothing is ever unpickled.
Taught in chapter 02.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto path; remove tmp_path on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter's config and tensors into `directory`."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(
        directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True))
    )


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
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); re-save the adapter") from e
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{weights_path} is not a readable safetensors file ({e}); it may be truncated or in another format. "
            "minipeft reads safetensors only (never pickle): re-save the adapter with save_pretrained()"
        ) from e
    return config, tensors
