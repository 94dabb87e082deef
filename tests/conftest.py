"""Runs before any test module is imported: Triton's CPU interpreter must be on before
minipeft's kernels are defined (ARCHITECTURE.md, "Kernels"), whatever module imports them first."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
