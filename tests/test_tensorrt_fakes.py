"""centra's TensorRT code against fakes of the tensorrt module, so it runs without tensorrt or a GPU: the
logger shows warnings and keeps errors until they are cleared, a failed build, load or batch reports its
own error and never an earlier one, and plans load only on the GPU (name and compute capability) that
built them, any difference refused in one line before a plan is read."""

from __future__ import annotations

import contextlib
import enum
import logging
from types import SimpleNamespace

import pytest
import torch

from centra.core.manifest import EngineInfo
from centra.errors import CentraError
from centra.export import tensorrt as export_trt
from centra.runtime import tensorrt as runtime_trt


class Severity(enum.Enum):  # tensorrt.ILogger.Severity's members, exported onto ILogger as in the bindings
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeILogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self):
        pass


class FakeTensorRT:
    """The few names of the tensorrt module that build_plan, Plan and TensorRTRunner.load touch; the
    builder fails (returns no plan) after logging `build_logs`."""

    __version__ = "10.9.0.34"
    ILogger = FakeILogger
    NetworkDefinitionCreationFlag = SimpleNamespace()
    BuilderFlag = SimpleNamespace()
    MemoryPoolType = SimpleNamespace(WORKSPACE=0)
    TensorIOMode = SimpleNamespace(INPUT=0, OUTPUT=1)

    def __init__(self, build_logs: list[tuple[Severity, str]] = ()):
        self.build_logs = list(build_logs)

    def Builder(self, logger):  # noqa: N802 (tensorrt's name)
        network = SimpleNamespace(num_inputs=0)

        def build(net, config):
            for severity, msg in self.build_logs:
                logger.log(severity, msg)
            return None

        return SimpleNamespace(create_network=lambda flags: network, create_optimization_profile=SimpleNamespace,
                               create_builder_config=lambda: SimpleNamespace(
                                   set_memory_pool_limit=lambda *a: None, add_optimization_profile=lambda p: 0),
                               build_serialized_network=build)

    def OnnxParser(self, network, logger):  # noqa: N802 (tensorrt's name)
        return SimpleNamespace(parse_from_file=lambda path: True)


@pytest.fixture
def fake_trt(monkeypatch) -> FakeTensorRT:
    """A fake tensorrt with a fresh centra logger, which already holds an error from an earlier failure."""
    fake = FakeTensorRT()
    monkeypatch.setattr(runtime_trt, "_LOGGER", None)
    runtime_trt.trt_logger(fake).log(Severity.ERROR, "stale: an earlier build failed\nits second line")
    assert runtime_trt.last_error() == "stale: an earlier build failed"
    return fake


def test_the_logger_shows_warnings_and_keeps_errors_until_cleared(fake_trt, caplog):
    logger = runtime_trt.trt_logger(fake_trt)
    with caplog.at_level(logging.INFO, logger="centra.tensorrt"):
        logger.log(Severity.WARNING, "Using an engine plan file across different models of devices is not "
                                     "recommended and is likely to affect performance or even cause errors.")
        logger.log(Severity.INFO, "Loaded engine size: 12 MiB")
        logger.log(Severity.VERBOSE, "Tactic 0x01 time 0.1 ms")
    assert [(r.levelno, r.name) for r in caplog.records] == [(logging.WARNING, "centra.tensorrt")]
    assert "across different models of devices" in caplog.records[0].getMessage()
    logger.log(Severity.INTERNAL_ERROR, "Assertion failed: cuda error")
    assert runtime_trt.last_error() == "Assertion failed: cuda error"
    runtime_trt.clear_errors()
    assert runtime_trt.last_error() == runtime_trt.NO_MESSAGE


def test_a_failed_build_reports_its_own_error_never_an_earlier_one(fake_trt, tmp_path):
    shapes = {"input_ids": ((1, 1), (1, 1), (1, 1))}
    with pytest.raises(CentraError) as caught:
        export_trt.build_plan(fake_trt, tmp_path / "g.onnx", tmp_path / "g.plan", shapes)
    assert str(caught.value) == f"g.onnx: TensorRT could not build an engine ({runtime_trt.NO_MESSAGE})"
    fake_trt.build_logs = [(Severity.ERROR, "this build: out of memory\ndetail")]
    with pytest.raises(CentraError, match=r"could not build an engine \(this build: out of memory\)$"):
        export_trt.build_plan(fake_trt, tmp_path / "g.onnx", tmp_path / "g.plan", shapes)


def test_a_failed_load_or_run_reports_its_own_error_never_an_earlier_one(fake_trt, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    (tmp_path / "g.plan").write_bytes(b"not a plan")
    runtime = SimpleNamespace(deserialize_cuda_engine=lambda data: None)
    with pytest.raises(CentraError, match=rf"cannot load this plan \({runtime_trt.NO_MESSAGE}\)"):
        runtime_trt.Plan(fake_trt, runtime, tmp_path / "g.plan", torch.device("cuda", 0))

    runtime_trt.trt_logger(fake_trt).log(Severity.ERROR, "stale: an earlier batch failed")
    context = SimpleNamespace(set_input_shape=lambda name, shape: True, set_tensor_address=lambda name, ptr: None,
                              get_tensor_shape=lambda name: (2, 3), execute_async_v3=lambda stream: False)
    plan = SimpleNamespace(max_batch=4, inputs=["hidden"], output="logits", context=context,
                           dtypes={"hidden": torch.float32, "logits": torch.float32})
    runner = object.__new__(runtime_trt.TensorRTRunner)  # no GPU: only what run_graph reads
    runner.plans, runner.device = {"task_a": plan}, torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    with pytest.raises(CentraError, match=rf"failed on a batch of 2 \({runtime_trt.NO_MESSAGE}\)$"):
        runner.run_graph("task_a", hidden=torch.zeros(2, 3))


@pytest.mark.parametrize(("name", "capability", "refused"), [
    ("NVIDIA A100-SXM4-80GB", "8.0", None),
    ("NVIDIA A100-PCIE-40GB", "8.0", "built on NVIDIA A100-SXM4-80GB (compute capability 8.0); this GPU is "
                                     "NVIDIA A100-PCIE-40GB (8.0)"),
    ("NVIDIA A100-SXM4-80GB", "9.0", "this GPU is NVIDIA A100-SXM4-80GB (9.0)"),
    (None, "8.0", "does not record the GPU that built the plans")])
def test_plans_load_only_on_the_gpu_that_built_them(fake_trt, tmp_path, monkeypatch, name, capability, refused):
    """The manifest's GPU name and compute capability against a fake device description: any difference is
    refused in one line, before any plan is read."""

    class Reached(Exception):
        pass

    def runtime(logger):
        raise Reached

    recorded = {"device": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    if name is None:  # a manifest without the GPU's record
        recorded, name = {}, "NVIDIA A100-SXM4-80GB"
    info = EngineInfo("tensorrt", "fp16", (), tensorrt=FakeTensorRT.__version__, **recorded)
    monkeypatch.setattr(fake_trt, "Runtime", runtime, raising=False)
    monkeypatch.setattr(runtime_trt, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(runtime_trt, "current_gpu", lambda: (torch.device("cuda", 0), name, capability))
    if refused is None:
        with pytest.raises(Reached):  # past the check: the plans would be deserialized now
            runtime_trt.TensorRTRunner.load(tmp_path, info, reference=None)
        return
    with pytest.raises(CentraError) as caught:
        runtime_trt.TensorRTRunner.load(tmp_path, info, reference=None)
    message = str(caught.value)
    assert "\n" not in message and refused in message and message.endswith("merge again on this machine"), message
