"""The Open Inference Protocol door (KServe v2: what Triton, KServe and tritonclient speak), over gRPC
(`inference.GRPCInferenceService`) and HTTP (`/v2/...`). The tensors and their meaning are
doors/oip_tensors.py's; this module carries them over the two transports.

    GET  /v2/health/live, /v2/health/ready, /v2        (open without a token, as gRPC's ServerLive/Ready)
    GET  /v2/models/centra[/versions/V], .../ready
    POST /v2/models/centra[/versions/V]/infer          JSON tensors, or JSON + binary tensors (tritonclient)

V (and gRPC's model_version) is the served version's name (v000003) or its number (3, the number of the
version folder `centra export-triton` writes), so a script that names a version runs against both.
"""

from __future__ import annotations

import asyncio
import functools
import json

from centra.core.protocol import MODEL
from centra.serve.call import Classifier, ServeError, with_headers
from centra.serve.doors import Door
from centra.serve.doors.oip_tensors import (
    HEADER_LENGTH,
    MAX_TENSORS,
    Output,
    Tensor,
    call_of,
    check_model,
    classification_of,
    classified,
    deadline_of,
    deserialize_bytes,
    metadata,
    outputs_of,
    parse_infer,
)
from centra.serve.http import parse_off_loop
from centra.serve.wire import parsed, parser

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "centra"
# what centra implements of the protocol's extensions (Triton's names)
EXTENSIONS = ["binary_tensor_data", "classification", "parameters"]
MAX_PARAMETERS = 64  # request (and input) parameters in one call


@functools.cache
def server_version() -> str:
    """The server's version: centra's installed package's (the model's version is in its own metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("centra")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


async def infer(classifier: Classifier, tensors: list[Tensor], requested: list[str], parameters: dict,
                deadline: float | None = None, classes: dict[str, int] | None = None, headers=()):
    """One inference through the classify path: (the engine that computed it, its outputs, those with a
    classification count in `classes` as their top classes). `headers`: the HTTP headers or gRPC metadata
    (a task's head, the request id: call.with_headers)."""
    call = with_headers(call_of(tensors, classifier.limits, parameters, deadline), headers)
    answered = await classifier.classify(call)
    return answered.engine, classified(outputs_of(answered, requested), classes or {}, answered.engine)


# ------------------------------------------------------------------------------------------ gRPC


def tensors_from_pb(request, max_inputs: int) -> list[Tensor]:
    """ModelInferRequest inputs, from raw_input_contents (what tritonclient sends; at most max_inputs
    elements each, counted as they are read) or typed contents (counted before parsing: wire.py)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ServeError(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    out = []
    for i, item in enumerate(request.inputs):
        values = deserialize_bytes(raw[i], item.name, max_inputs) if raw else list(item.contents.bytes_contents)
        out.append(Tensor(item.name, item.datatype, tuple(item.shape), values))
    return out


def parameters_from_pb(parameters) -> dict:
    """A map<string, InferParameter> as {name: plain value}."""
    out = {}
    for name, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        out[name] = getattr(parameter, which) if which else None
    return out


def response_to_pb(request, engine, outputs: list[Output]):
    from centra.serve.inference import open_inference_grpc_pb2 as ip

    response = ip.ModelInferResponse(model_name=MODEL, model_version=engine.version, id=request.id)
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(output.raw())
    return response


class InferenceServicer:
    """inference.GRPCInferenceService over the classify path (the `mapped` status codes of status.py)."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    async def ServerLive(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        return ip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        return ip.ServerReadyResponse(ready=self.classifier.ready)

    async def ServerMetadata(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        return ip.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        try:
            check_model(request.name, request.version, self.classifier.engine)
        except ServeError:  # as Triton answers: an unknown model or version is not ready
            return ip.ModelReadyResponse(ready=False)
        return ip.ModelReadyResponse(ready=self.classifier.ready)

    async def ModelMetadata(self, request, context):
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        engine = self.classifier.engine
        check_model(request.name, request.version, engine)
        meta = metadata(engine)
        return ip.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[ip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[ip.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):
        check_model(request.model_name, request.model_version, self.classifier.engine)
        now = asyncio.get_running_loop().time()
        remaining = context.time_remaining()
        parameters = parameters_from_pb(request.parameters)
        deadline = deadline_of(parameters, now, None if remaining is None else now + remaining)
        tensors = tensors_from_pb(request, self.classifier.limits.max_inputs)
        classes = {o.name: classification_of(parameters_from_pb(o.parameters), o.name) for o in request.outputs}
        engine, outputs = await infer(self.classifier, tensors, [o.name for o in request.outputs],
                                      parameters, deadline, classes, context.invocation_metadata() or ())
        return response_to_pb(request, engine, outputs)


# ------------------------------------------------------------------------------------------ HTTP


def infer_response(doc: dict, engine, outputs: list[Output], requested: dict[str, bool], binary_output: bool):
    from aiohttp import web

    head = {"model_name": MODEL, "model_version": engine.version, "outputs": []}
    if isinstance(doc.get("id"), str) and doc["id"]:
        head["id"] = doc["id"]
    blobs = []
    for output in outputs:
        entry = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if requested.get(output.name, binary_output):
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = output.data()
        head["outputs"].append(entry)
    text = json.dumps(head, ensure_ascii=False).encode("utf-8")
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(body=text + b"".join(blobs), headers={HEADER_LENGTH: str(len(text))},
                        content_type="application/octet-stream")


class OipDoor(Door):
    name = "oip"
    grpc_services = (SERVICE,)
    open_prefixes = (f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady", "/v2/health/")

    def grpc_files(self) -> list:
        from centra.serve.inference import open_inference_grpc_pb2 as ip

        return [ip.DESCRIPTOR]  # from the stubs' own pool: reflection's pool copies it (serve/reflection.py)

    def add_grpc(self, server, classifier: Classifier) -> None:
        """Register inference.GRPCInferenceService (status codes by `mapped`; ModelInfer's request over the
        limits, or with more than MAX_TENSORS inputs, refused unparsed)."""
        import grpc

        from centra.serve.inference import open_inference_grpc_pb2 as ip
        from centra.serve.status import mapped

        servicer = InferenceServicer(classifier)
        rows = classifier.limits.max_inputs
        # ModelInferRequest's fields: inputs (each: its contents, each of whose typed lists holds at most a
        # row per element), requested outputs, raw contents, parameters; counted before protobuf parses them
        contents = {field: (rows, "elements in an input's contents") for field in range(1, 9)}
        tensor = {5: (1, "contents of an input", contents), 4: (MAX_PARAMETERS, "parameters of an input")}
        output = {2: (MAX_PARAMETERS, "parameters of an output")}
        counts = {5: (MAX_TENSORS, "input tensors", tensor), 6: (MAX_TENSORS, "requested outputs", output),
                  7: (MAX_TENSORS, "raw input contents"), 4: (MAX_PARAMETERS, "request parameters")}
        handlers = {}
        for name in ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"):
            method = ip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[name]
            request = getattr(ip, method.input_type.name)
            response = getattr(ip, method.output_type.name)
            limit, counted = (classifier.limits.framed_bytes, counts) if name == "ModelInfer" else (1 << 16, None)
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                mapped(parsed(getattr(InferenceServicer, name))).__get__(servicer),
                request_deserializer=parser(request, limit, counted),
                response_serializer=response.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)

    def http_routes(self, classifier: Classifier, http) -> list:
        from aiohttp import web

        async def live(request):
            return web.json_response({"live": True})

        async def ready(request):
            return web.json_response({"ready": classifier.ready}, status=200 if classifier.ready else 503)

        async def server_metadata(request):
            return web.json_response({"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS})

        async def model_metadata(request):
            engine = classifier.engine
            check_model(request.match_info["model"], request.match_info.get("version", ""), engine)
            return web.json_response(metadata(engine))

        async def model_ready(request):
            check_model(request.match_info["model"], request.match_info.get("version", ""), classifier.engine)
            return web.json_response({"name": request.match_info["model"], "ready": classifier.ready},
                                     status=200 if classifier.ready else 503)

        async def infer_route(request):
            check_model(request.match_info["model"], request.match_info.get("version", ""), classifier.engine)
            body = await http.read_body(request)
            header = request.headers.get(HEADER_LENGTH)
            parsed = await parse_off_loop(lambda data: parse_infer(data, header, classifier.limits.max_inputs), body)
            parameters = parsed.doc.get("parameters")
            deadline = deadline_of(parameters, asyncio.get_running_loop().time())
            engine, outputs = await infer(classifier, parsed.tensors, list(parsed.outputs), parameters, deadline,
                                          parsed.classes, request.headers)
            return infer_response(parsed.doc, engine, outputs, parsed.outputs, parsed.binary_output)

        routes = [web.get("/v2/health/live", live), web.get("/v2/health/ready", ready),
                  web.get("/v2", server_metadata)]
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [web.get(base, model_metadata), web.get(base + "/ready", model_ready),
                       web.post(base + "/infer", infer_route)]
        return routes


DOOR = OipDoor()
