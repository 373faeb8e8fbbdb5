"""The house: every module's imports follow the one-way rules of the layers (README.md, "The house"; the
design notes: ../shared/DESIGN.md beside the repository, "The house"), and measuring code lives in measure/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "centra"
BASE = {"centra", "centra.errors", "centra.io", "centra.publish", "centra.progress"}
# layer -> layers it may import (besides itself and the base modules)
ALLOWED = {
    "base": set(),
    "core": set(),
    "train": {"core"},
    "runtime": {"core"},
    "export": {"core", "runtime", "serve"},  # serve: the Triton python repository ships serve's Triton door
    "serve": {"core", "runtime"},
    "measure": {"core", "train", "runtime", "export", "serve"},
    "cli": {"core", "train", "runtime", "export", "serve", "measure"},
    "api": {"core", "train", "runtime", "export", "serve"},  # the package root: the public API, never the CLI
}
# third-party packages that only their own layers may import, and only inside functions (lazily); measure's
# benchmark clients and soak call the server over gRPC and HTTP
HEAVY = {"grpc": {"serve", "measure"}, "grpc_health": {"serve", "measure"}, "grpc_reflection": {"serve", "measure"},
         "aiohttp": {"serve", "measure"}, "aiohttp_cors": {"serve"}, "onnxruntime": {"runtime", "export", "measure"},
         "tensorrt": {"runtime", "export", "measure"}, "onnx": {"export", "runtime", "measure"}}
# module names that say "measuring": they belong in measure/, never in the layers measure measures
MEASURING = ("bench", "soak", "scale", "probe", "tritonserver")
# modules outside a layer's folder that belong to it
LAYER_OF_MODULE = {"centra.client": "serve", "centra": "api"}
# generated stubs (tools/gen_protos.py): the grpc module imports grpc at module level, as protoc writes it
GENERATED = ("centra.serve.v1.", "centra.serve.inference.")
# what each base module may import of centra's
BASE_ALLOWED = {"centra.errors": set(), "centra.io": {"centra.errors"},
                "centra.publish": {"centra.errors", "centra.io"}, "centra.progress": set()}
# the base modules core may import
CORE_BASE = ("centra.errors", "centra.io", "centra.publish")


def layer_of(module: str) -> str:
    if module in LAYER_OF_MODULE:
        return LAYER_OF_MODULE[module]
    if module in BASE:
        return "base"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "base"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(imported module, imported at module level?) for every import statement in the source."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = [f"centra.{alias.name}" for alias in node.names] if base == "centra" else [base]
            found += [(name, id(node) in top_level) for name in names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Broken rules in one module's source."""
    mine = layer_of(module)
    problems = []
    for name, top in imports_of(source, module, is_package):
        root = name.split(".")[0]
        if root in HEAVY:
            if mine not in HEAVY[root]:
                problems.append(f"{module} imports {name}: only {sorted(HEAVY[root])} may")
            elif top and not module.startswith(GENERATED):
                problems.append(f"{module} imports {name} at module level: import it inside the function")
            continue
        if root != "centra":
            continue
        if name in BASE:
            if mine == "base" and name not in BASE_ALLOWED.get(module, set()) and name != module:
                problems.append(f"{module} (a base module) imports {name}")
            if mine == "core" and name not in CORE_BASE:
                problems.append(f"{module} (core) imports {name}: core imports only errors, io and publish")
            continue
        if mine == "base":
            problems.append(f"{module} (a base module) imports {name}")
            continue
        theirs = layer_of(name)
        if theirs == "cli" and mine != "cli":
            problems.append(f"{module} imports {name}: nothing imports the CLI")
        elif theirs != mine and theirs not in ALLOWED[mine]:
            problems.append(f"{module} ({mine}) imports {name} ({theirs})")
    return problems


def test_every_module_follows_the_import_rules():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 15, "the package was not found"
    problems = []
    for path in modules:
        problems += violations(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    assert problems == []


def test_the_layers_exist():
    for layer in ("core", "train", "runtime", "serve", "measure", "cli"):
        assert (PACKAGE / layer / "__init__.py").is_file(), layer


def misplaced(paths: list[Path]) -> list[str]:
    """Measuring modules (benchmarks, soak, scale, probes, the tritonserver launcher) outside measure/ and cli/."""
    found = []
    for path in paths:
        parts = path.relative_to(PACKAGE).parts
        if len(parts) > 1 and parts[0] not in ("measure", "cli") and path.stem.startswith(MEASURING):
            found.append("/".join(parts))
    return found


def test_measuring_code_lives_in_measure():
    """serve/ holds serving only, export/ exporting only: no benchmark, soak, scale or probe module there."""
    assert misplaced(sorted(PACKAGE.rglob("*.py"))) == []
    assert misplaced([PACKAGE / "serve" / "bench.py", PACKAGE / "export" / "soak_calls.py",
                      PACKAGE / "runtime" / "bench.py", PACKAGE / "measure" / "bench.py"]) == \
        ["serve/bench.py", "export/soak_calls.py", "runtime/bench.py"]


def test_measuring_types_have_names_of_their_own():
    """Each benchmark has its own options and result types: no class in measure/ shares its name with
    another class of the package (two BenchOptions once meant two different things)."""
    owners: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                owners.setdefault(node.name, []).append(module_name(path))
    shared = {name: found for name, found in owners.items()
              if len(found) > 1 and any(layer_of(m) == "measure" for m in found)}
    assert shared == {}


def test_the_checker_catches_each_kind_of_break():
    """The rules test would fail on each broken rule (so the test above can fail)."""
    cases = {
        ("centra.core.task", "from centra.runtime.engine import Engine"): "imports centra.runtime.engine",
        ("centra.core.task", "from centra.train import pipeline"): "(core) imports centra.train",
        ("centra.train.pipeline", "from centra.runtime.engine import encode"): "(train) imports",
        ("centra.runtime.engine", "from centra.train.data import Columns"): "(runtime) imports",
        ("centra.runtime.engine", "from centra.cli import main"): "nothing imports the CLI",
        ("centra.serve.server", "from centra.measure.languages import run_one"): "(serve) imports centra.measure",
        ("centra.measure.languages", "from centra.cli import main"): "nothing imports the CLI",
        ("centra.core.merge", "import grpc"): "only ['measure', 'serve'] may",
        ("centra.export.onnx", "import grpc"): "only ['measure', 'serve'] may",
        ("centra.measure.soak_calls", "import grpc"): "at module level",
        ("centra.runtime.onnx", "import onnxruntime"): "at module level",
        ("centra.io", "from centra.core.task import TaskSpec"): "(a base module) imports",
        ("centra.errors", "from centra.io import read_json"): "(a base module) imports centra.io",
        ("centra.io", "from centra.publish import publish_folder"): "(a base module) imports centra.publish",
        ("centra.publish", "from centra.core.versions import CURRENT"): "(a base module) imports",
        ("centra.core.task", "from ..runtime import engine"): "(core) imports centra.runtime",
        ("centra.core.task", "from centra.progress import progress_bar"): "core imports only errors, io and publish",
        ("centra.serve.server", "import grpc"): "at module level",
        ("centra.client", "import grpc"): "at module level",
        ("centra.client", "from centra.train.data import Columns"): "(serve) imports centra.train",
        ("centra.serve.batcher", "from centra.cli import main"): "nothing imports the CLI",
        ("centra", "from centra.cli import main"): "nothing imports the CLI",
        ("centra", "import grpc"): "only ['measure', 'serve'] may",
        ("centra.core.task", "from centra import Engine"): "(core) imports centra.Engine",
    }
    for (module, line), message in cases.items():
        found = violations(line + "\n", module)
        assert any(message in p for p in found), (module, line, found)
    fine = {("centra.runtime.onnx", "def f():\n    import onnxruntime\n"),
            ("centra.cli.demo", "from centra.train.pipeline import train_task\n"),
            ("centra.train.cache", "from centra.core.tokens import Encoded\nfrom centra.progress import bar\n"),
            ("centra.io", "from centra.errors import CentraError\n"),
            ("centra.publish", "from centra.io import write_json\n"),
            ("centra.core.versions", "from centra.publish import locked\n"),
            ("centra.serve.v1.centra_pb2_grpc", "import grpc\nfrom centra.serve.v1 import centra_pb2\n"),
            ("centra.client", "def f():\n    import grpc\n"),
            ("centra.measure.bench_clients", "def f():\n    import grpc\n"),
            ("centra.serve.call", "from centra.runtime.engine import Row\n"),
            ("centra", "def f():\n    from centra.runtime.engine import Engine\n"),
            ("centra.core.task", "from centra import io\n")}
    for module, source in fine:
        assert violations(source, module) == [], (module, source)
