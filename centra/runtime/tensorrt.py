"""TensorRT engine (GPU): the merged model's graphs as serialized TensorRT engines, run with the torch
engine's savings.

`centra merge --engine tensorrt --precision fp32|fp16|int8` (centra.export.tensorrt) builds one plan per
graph of `graph_layout` on the GPU it runs on and records them in the manifest's "engine" field; the
files are hashed with the rest of the version. A plan runs only on the GPU model and TensorRT version it
was built with (TensorRT's support matrix: plans are not portable across devices; at the same compute
capability TensorRT only warns): the manifest records the GPU's name and compute capability, and loading
refuses another TensorRT version, GPU name or compute capability with one line (merge again on the
serving machine).

GraphRunner walks the graphs; here each graph is an execution context whose tensors live in torch CUDA
memory, run on the runner's own stream, so hidden states stay on the GPU from graph to graph and only
the logits come back. Graph inputs and outputs are fp32 (ids and mask int64) whatever the precision inside.
A batch larger than the plan's optimization profile is run in slices of the profile's largest batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from centra.core import PRECISIONS as ENGINE_PRECISIONS
from centra.core.graph import MergedModel
from centra.core.manifest import EngineInfo
from centra.errors import CentraError
from centra.runtime.graphs import GraphRunner, check_engine_field

ENGINE_NAME = "tensorrt"
PRECISIONS = ENGINE_PRECISIONS[ENGINE_NAME]
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32,
                "BOOL": torch.bool, "INT8": torch.int8}
MAX_ERRORS = 8  # TensorRT's errors kept for a one-line message: a failure logs a few, the last says most
NO_MESSAGE = "no message from TensorRT"
log = logging.getLogger("centra.tensorrt")


def import_tensorrt():
    """tensorrt and a CUDA device, or one line saying which is missing."""
    try:
        import tensorrt
    except ImportError:
        raise CentraError("the TensorRT engine needs the tensorrt package (pip install tensorrt) and a CUDA "
                          "GPU") from None
    if not torch.cuda.is_available():
        raise CentraError("the TensorRT engine needs a CUDA GPU; torch sees none")
    return tensorrt


class TensorRTLog:
    """What TensorRT logs, sorted for centra (plain Python: the tests feed it without tensorrt).

    Errors are kept (the first line of the last MAX_ERRORS) for the one-line CentraError of the build, load
    or run that failed, and `clear`ed when one starts, so a failure never reports an earlier, unrelated
    message. Warnings go to Python logging at WARNING (among them TensorRT's own warning that a plan runs on
    another GPU model than the one that built it). Info and verbose messages are dropped: TensorRT's default
    logger would print them to stdout, beside centra's JSON lines."""

    def __init__(self, errors: tuple, warnings: tuple):
        self.error_levels, self.warning_levels = errors, warnings
        self.errors: list[str] = []
        self.lock = threading.Lock()  # TensorRT may call its logger from any thread

    def record(self, severity, msg: object) -> None:
        text = str(msg).strip()
        if severity in self.error_levels:
            with self.lock:
                self.errors.append(text.splitlines()[0] if text else "error")
                del self.errors[:-MAX_ERRORS]
        elif severity in self.warning_levels:
            log.warning("TensorRT: %s", text)

    def clear(self) -> None:
        with self.lock:
            self.errors.clear()

    def last(self) -> str:
        with self.lock:
            return self.errors[-1] if self.errors else NO_MESSAGE


_LOGGER = None


def trt_logger(trt):
    """One logger for every builder and runtime (as NVIDIA's samples keep one), forwarding to a
    TensorRTLog (`.sink`)."""
    global _LOGGER
    if _LOGGER is None:
        severity = trt.ILogger
        sink = TensorRTLog((severity.INTERNAL_ERROR, severity.ERROR), (severity.WARNING,))

        class Forwarding(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.sink = sink

            def log(self, severity, msg):
                self.sink.record(severity, msg)

        _LOGGER = Forwarding()
    return _LOGGER


def clear_errors() -> None:
    """Forget TensorRT's earlier errors: called when a build, a plan load or a graph run starts (one at a
    time in centra: the engine runs one batch at a time), so `last_error` names only its own."""
    if _LOGGER is not None:
        _LOGGER.sink.clear()


def last_error() -> str:
    """TensorRT's last error message since `clear_errors`, for a one-line CentraError."""
    return _LOGGER.sink.last() if _LOGGER is not None else NO_MESSAGE


def gpu_description(device: torch.device) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device, as the manifest records them."""
    return torch.cuda.get_device_name(device), ".".join(map(str, torch.cuda.get_device_capability(device)))


def current_gpu() -> tuple[torch.device, str, str]:
    """The current CUDA device, its name and compute capability."""
    device = torch.device("cuda", torch.cuda.current_device())
    return (device, *gpu_description(device))


def check_gpu(source: Path, info: EngineInfo, name: str, capability: str) -> None:
    """Refuse, in one line, plans built on another GPU model or compute capability, or on a GPU the
    manifest does not name: TensorRT would load some of them and warn, and run them slower or wrong."""
    if not info.device or not info.compute_capability:
        raise CentraError(f"{source}: the manifest does not record the GPU that built the plans; this GPU is "
                          f"{name} ({capability}): merge again on this machine")
    if info.device != name or info.compute_capability != capability:
        raise CentraError(f"{source}: the plans were built on {info.device} (compute capability "
                          f"{info.compute_capability}); this GPU is {name} ({capability}): merge again on this "
                          "machine")


class Plan:
    """One deserialized engine and its execution context: names, dtypes and the profile's largest batch."""

    def __init__(self, trt, runtime, path: Path, device: torch.device):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CentraError(f"{path}: cannot read the TensorRT plan ({exc.strerror or exc})") from None
        with torch.cuda.device(device):
            clear_errors()
            self.engine = runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise CentraError(f"{path}: TensorRT {trt.__version__} cannot load this plan ({last_error()}): "
                                  "merge again on this machine")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(outputs) != 1:
            raise CentraError(f"{path}: a centra plan has one output; this one has {len(outputs)}")
        self.output = outputs[0]
        self.dtypes = {n: TORCH_DTYPES.get(self.engine.get_tensor_dtype(n).name) for n in names}
        unknown = [n for n, d in self.dtypes.items() if d is None]
        if unknown:
            raise CentraError(f"{path}: tensor {unknown[0]!r} has a type centra does not feed")
        # profile 0's largest shape of the first input: (batch, sequence[, hidden])
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])


class TensorRTRunner(GraphRunner):
    """The Runner protocol over TensorRT plans, one per graph of `graph_layout`, on one CUDA device."""

    def __init__(self, specs, cfg, plans: dict[str, Plan], layout: list[dict], precision: str,
                 reference: MergedModel | None = None, device: torch.device | None = None):
        super().__init__(specs, cfg, layout, precision, reference)
        self.plans = plans
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)  # TensorRT syncs more on the legacy default stream
        missing = [g["name"] for g in layout if g["name"] not in plans]
        if missing:
            raise CentraError(f"TensorRT engine: no plan for graph {missing[0]!r}")

    @classmethod
    def load(cls, folder: Path, info: EngineInfo | None, reference: MergedModel, warm: bool = True,
             files: Mapping[str, str] | None = None) -> TensorRTRunner:
        """Plans of a version folder (`info`: its manifest's engine field; `files`: the files its manifest
        hashed), deserialized on the current GPU."""
        check_engine_field(folder, info, ENGINE_NAME, "TensorRT plans", info.precision if info else None, PRECISIONS)
        source = Path(folder) / "manifest.json"
        trt = import_tensorrt()
        if info.tensorrt and info.tensorrt != trt.__version__:
            raise CentraError(f"{source}: the plans were built by TensorRT {info.tensorrt}; this is "
                              f"{trt.__version__}: merge again on this machine")
        device, name, capability = current_gpu()
        check_gpu(source, info, name, capability)
        runtime = trt.Runtime(trt_logger(trt))  # kept alive by the engines it deserializes
        return cls.open(folder, info, "plan", lambda path: Plan(trt, runtime, path, device), reference.specs,
                        reference.cfg, info.precision, reference, warm, files, device=device)

    @property
    def runtime(self) -> str:
        return f"tensorrt {self.precision}"

    def forward_rows(self, *args, **kwargs):
        with torch.cuda.stream(self.stream):
            return super().forward_rows(*args, **kwargs)

    def warm_up(self) -> None:
        with torch.cuda.stream(self.stream):
            super().warm_up()
        self.stream.synchronize()

    def run_graph(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        plan = self.plans[name]
        batch = next(iter(inputs.values())).shape[0]
        if batch > plan.max_batch:  # the profile's limit: slices of it, joined
            parts = [self.run_graph(name, **{k: v[s: s + plan.max_batch] for k, v in inputs.items()})
                     for s in range(0, batch, plan.max_batch)]
            return torch.cat(parts)
        context = plan.context
        clear_errors()
        fed = []  # kept alive until the work is queued
        for key in plan.inputs:
            if key not in inputs:
                raise CentraError(f"TensorRT graph {name!r} takes {key!r}, which the engine did not give")
            tensor = inputs[key].to(device=self.device, dtype=plan.dtypes[key]).contiguous()
            fed.append(tensor)
            if not context.set_input_shape(key, tuple(tensor.shape)):
                raise CentraError(f"TensorRT graph {name!r}: input {key!r} of shape {tuple(tensor.shape)} is "
                                  f"outside the plan's optimization profile ({last_error()})")
            context.set_tensor_address(key, tensor.data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape(plan.output)), dtype=plan.dtypes[plan.output],
                          device=self.device)
        context.set_tensor_address(plan.output, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise CentraError(f"TensorRT graph {name!r} failed on a batch of {batch} ({last_error()})")
        return out.float()
