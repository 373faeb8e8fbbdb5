"""centra: serve many BERT-family classifiers that share one frozen encoder.

The package root is the public Python API (README.md, "Python API"): load a backbone, train a task (from a
recipe or a settings object: a TrainingReport back), plan, merge, load an engine and predict, evaluate,
serve in process, and the client. `cli/` is a thin door over the same functions.

Every name is imported when first used (the module's `__getattr__`): `import centra` imports neither
torch nor grpc, and the CLI, which does not use these names, starts as fast as it did.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute" it is read from
_API = {
    "CentraError": "centra.errors:CentraError",
    # backbones and training
    "Backbone": "centra.core.backbone:Backbone",
    "load_backbone": "centra.core.backbone:Backbone.load",
    "Settings": "centra.train.settings:Settings",
    "TaskJob": "centra.train.job:TaskJob",
    "Columns": "centra.train.data:Columns",
    "TrainingReport": "centra.train.report:TrainingReport",
    "add_task": "centra.train.recipe:add_task",
    "train_task": "centra.train.pipeline:train_task",
    # choosing heads under a budget, merging
    "PlanResult": "centra.train.planning:PlanResult",
    "plan_tasks": "centra.train.planning:plan_tasks",
    "activate_plan": "centra.train.planning:activate_plan",
    "train_shallower": "centra.train.planning:train_shallower",
    "merge": "centra.export.engines:merge",
    "Manifest": "centra.core.manifest:Manifest",
    # running a merged model
    "Engine": "centra.runtime.engine:Engine",
    "load_engine": "centra.runtime.engine:Engine.load",
    "verify": "centra.runtime.verify:verify",
    "evaluate": "centra.train.evaluate:evaluate",
    # serving, and the client
    "BackgroundServer": "centra.serve.background:BackgroundServer",
    "serve_model": "centra.serve.app:serve_model",
    "ServeOptions": "centra.serve.server:ServeOptions",
    "AppOptions": "centra.serve.app:AppOptions",
    "Client": "centra.client:Client",
    "RemoteError": "centra.client:RemoteError",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'centra' has no attribute {name!r}")
    module, _, path = target.partition(":")
    value = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    globals()[name] = value  # once read, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
