"""The README's library example runs as written (in a temporary folder, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import minipeft as mp

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    # 4 layers x (LoRA on c_attn: r x (128 + 384)) + the 6-way head (128 x 6), HF peft's print format.
    assert "trainable params: 17,152 ||" in capsys.readouterr().out
    loaded = mp.PeftModel.from_pretrained(mp.models.load_classifier(6)[0], tmp_path / "my-adapter")
    assert loaded.peft_config["default"].r == 8 and loaded.get_nb_trainable_parameters()[1] > 1_300_000
