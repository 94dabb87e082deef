"""minipeft without triton, and Triton without a GPU or interpreter, in a fresh process
(the interpreter switch is read once, when the kernels are defined)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import sys
import torch
sys.modules["triton"] = None  # as on macOS / Windows: `import triton` fails
import minipeft as mp
from minipeft.models import tiny_gpt2

ids = torch.randint(3, 200, (1, 5))
for kernel in ("auto", "torch", "triton"):
    model = mp.get_peft_model(tiny_gpt2(), mp.LoraConfig(r=2, target_modules=["c_attn"], kernel=kernel))
    try:
        print(kernel, "ran", tuple(model(input_ids=ids).logits.shape))
    except RuntimeError as e:
        print(kernel, "error", e)
del sys.modules["triton"]  # now triton imports, but no GPU and no TRITON_INTERPRET
try:
    model(input_ids=ids)
except RuntimeError as e:
    print("no-interpreter error", e)
"""


def test_without_triton_and_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "auto ran (1, 5, 256)" and lines[1] == "torch ran (1, 5, 256)"
    assert lines[2].startswith("triton error kernel='triton' needs the triton package")
    assert lines[3].startswith("no-interpreter error kernel='triton' got tensors on cpu")
    assert "TRITON_INTERPRET=1" in lines[3] and "active drivers" not in run.stdout
