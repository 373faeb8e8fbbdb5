"""Reading a Triton model repository in tests, without a Triton server: each config.pbtxt parsed with
Triton's own ModelConfig protobuf (tritonclient's model_config_pb2.py, loaded from its file so grpc is
not imported), an ensemble's wiring checked tensor by tensor against its step models' configs, and the
repository's summary (centra-triton.json). Used by test_triton.py and test_triton_tensorrt.py."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import pytest

from centra.export import triton


@cache
def model_config_pb2():
    """tritonclient's generated model_config_pb2 (inference.ModelConfig, DataType), loaded from its file
    (importing tritonclient.grpc would import grpc)."""
    spec = importlib.util.find_spec("tritonclient")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip(f"{path} not found in tritonclient")
    module_spec = importlib.util.spec_from_file_location("centra_tests_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def data_type(name: str) -> int:
    return model_config_pb2().DataType.Value(name)


def parse_config(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2().ModelConfig())


def configs_of(repo: Path) -> dict:
    """model name -> parsed config, for every model folder of the repository."""
    found = {p.parent.name: parse_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}
    assert found and all(cfg.name == name for name, cfg in found.items())
    return found


def signature(tensor) -> tuple[int, tuple[int, ...]]:
    return tensor.data_type, tuple(tensor.dims)


def wiring_problems(configs: dict, ensemble: str = triton.ENSEMBLE) -> list[str]:
    """What Triton's ensemble scheduler would reject or mis-wire, one line each (empty: consistent)."""
    ens, problems = configs[ensemble], []
    known = {t.name: signature(t) for t in ens.input}  # ensemble tensor -> (data type, dims) so far
    used, produced = set(), {}
    for i, step in enumerate(ens.ensemble_scheduling.step):
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"step {i}: no model {step.model_name!r}")
            continue
        if model.max_batch_size < ens.max_batch_size:
            problems.append(f"{step.model_name}: max_batch_size below the ensemble's")
        inputs, outputs = {t.name: t for t in model.input}, {t.name: t for t in model.output}
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"{step.model_name}: input_map names {key!r}, not an input of the model")
            elif value not in known:
                problems.append(f"{step.model_name}.{key} <- {value!r}: neither an ensemble input nor an earlier "
                                "output")
            elif known[value] != signature(inputs[key]):
                problems.append(f"{step.model_name}.{key} <- {value!r}: type/dims {known[value]} vs "
                                f"{signature(inputs[key])}")
            used.add(value)
        problems += [f"{step.model_name}.{name}: not fed" for name in inputs if name not in step.input_map]
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"{step.model_name}: output_map names {key!r}, not an output of the model")
                continue
            if value in produced or value in {t.name for t in ens.input}:
                problems.append(f"{value!r} written twice")
            produced[value] = known[value] = signature(outputs[key])
    for tensor in ens.output:
        if tensor.name not in produced:
            problems.append(f"ensemble output {tensor.name!r} is produced by no step")
        elif produced[tensor.name] != signature(tensor):
            problems.append(f"ensemble output {tensor.name!r}: type/dims {produced[tensor.name]} vs "
                            f"{signature(tensor)}")
    problems += [f"ensemble input {t.name!r} is used by no step" for t in ens.input if t.name not in used]
    return problems


def summary_of(repo: Path) -> dict:
    return json.loads((repo / triton.SUMMARY).read_text())
