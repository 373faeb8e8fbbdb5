"""The wheel a user installs: `python -m build` makes it from the package's files alone (a copy of
pyproject.toml, README.md and centra/: nothing else of the checkout), with its package data (the proto
files, the Triton model template, the stubs' .pyi); installed (not editable) into a new venv, the
`centra` command, `centra predict` on a tiny merged model and the public API run from it.

No network: the wheel is built without build isolation (with this environment's setuptools) and
installed with --no-index --no-deps. The new venv sees this environment's packages through a .pth line
placed after its own site-packages (the packages, not their .pth files: the editable centra of this
checkout stays out of it), so centra comes from the wheel and its dependencies from here; the test then
checks that every dependency the wheel declares is installed at a version it accepts, as pip's resolver
would have on an index. Slow: a venv with pip is made (ensurepip), and the commands import torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PACKAGE_DATA = ("centra/protos/centra/v1/centra.proto", "centra/protos/inference/open_inference_grpc.proto",
                "centra/export/triton_model.py", "centra/serve/v1/centra_pb2.py", "centra/serve/v1/centra_pb2.pyi",
                "centra/serve/inference/open_inference_grpc_pb2.py")
DEPENDENCIES_MET = """
import importlib.metadata as md
from packaging.requirements import Requirement
unmet = []
for line in md.requires("centra") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's (dev), not the package's
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        unmet.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req} (installed: {have})")
print("\\n".join(unmet) or "ok")
"""
PUBLIC_API = """
import json, centra
names = {name: type(getattr(centra, name)).__name__ for name in centra.__all__}
print(json.dumps({"file": centra.__file__, "version": centra.__version__, "names": names}))
"""


def run(args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "centra", source / "centra", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, source], cwd=source)
    [built] = dist.glob("centra-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", folder], cwd=folder)
    python = folder / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder).stdout.strip()
    # this environment's packages, after the venv's own (a path line: its .pth files are not run)
    (Path(site) / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed", wheel], cwd=folder)
    return folder


def test_the_wheel_holds_the_package_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = [name for name in PACKAGE_DATA if name not in names]
    assert not missing, missing
    assert "centra = centra.cli:main_exit" in entry_points
    assert not [n for n in names if n.startswith(("tests/", "tools/", "tasks/"))], "only the package ships"


def test_the_installed_wheel_runs(venv, model_out, tmp_path):
    python, command = venv / "bin" / "python", venv / "bin" / "centra"
    assert run([python, "-c", DEPENDENCIES_MET], cwd=tmp_path).stdout.strip() == "ok"
    api = json.loads(run([python, "-c", PUBLIC_API], cwd=tmp_path).stdout)
    assert Path(api["file"]).is_relative_to(venv), f"centra imported from {api['file']}, not the wheel"
    assert {"load_engine", "merge", "train_task", "BackgroundServer", "Client", "ServeOptions"} <= set(api["names"])
    protos = run([python, "-c", "import importlib.resources as r; "
                  "print((r.files('centra') / 'protos/centra/v1/centra.proto').read_text()[:200])"], cwd=tmp_path)
    assert "syntax" in protos.stdout or "centra" in protos.stdout
    assert "serve" in run([command, "--help"], cwd=tmp_path).stdout
    lines = run([command, "predict", "--model", model_out, "--task", "alpha", "the delivery was late"],
                cwd=tmp_path).stdout.splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["task"] for a in answers] == ["alpha"] and "label" in answers[0]
