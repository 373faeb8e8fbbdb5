"""The package root is the public API: `import centra` stays light (no torch, no grpc), every public name
resolves, and the README's Python example runs as written, on a tiny backbone in a temp folder (nothing
is downloaded)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import centra

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The one python block of the README's "Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


def test_import_centra_is_light():
    code = ("import sys, centra; heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc', "
            "'transformers', 'onnxruntime')); assert not heavy, heavy; assert centra.__version__")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves():
    for name in centra.__all__:
        assert getattr(centra, name) is not None, name
    assert centra.load_engine == centra.Engine.load and centra.load_backbone == centra.Backbone.load
    assert set(centra.__all__) <= set(dir(centra))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        centra.nope  # noqa: B018


def test_library_errors_name_fields_not_flags(tmp_path):
    with pytest.raises(centra.CentraError) as caught:
        centra.merge(tmp_path / "tasks", tmp_path / "out", engine="onnx", precision="fp16")
    assert str(caught.value).startswith("precision fp16 does not apply to engine onnx (engine onnx: fp32, int8")
    assert "--" not in str(caught.value)


def test_the_readme_example_runs(bert_path, tmp_path, capsys):
    code = readme_example()
    for line, replacement in {'BACKBONE = "default"': f"BACKBONE = {str(bert_path)!r}",
                              'WORK = Path("centra-example")': f"WORK = Path({str(tmp_path / 'example')!r})"}.items():
        assert line in code, line
        code = code.replace(line, replacement, 1)
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), scope)
    out = capsys.readouterr().out
    assert isinstance(scope["report"], centra.TrainingReport) and isinstance(scope["manifest"], centra.Manifest)
    assert "layers per request" in out and "dev accuracy" in out
    local = scope["engine"].predict(["the box arrived broken"], tasks=["sentiment"])
    served = scope["answers"]
    assert len(served) == len(local) == 1 and served[0]["label"] == local[0]["label"] in ("positive", "negative")
    assert max(abs(served[0]["scores"][k] - v) for k, v in local[0]["scores"].items()) < 1e-5
    assert (tmp_path / "example" / "model" / "current").exists()
