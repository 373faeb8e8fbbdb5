"""centra.v1 over gRPC: `Classify` (texts, optional pairs and the tasks wanted) and `ListTasks`.

The request is bounded before protobuf parses it (serve/wire.py: its length, its count of inputs and of
task names), becomes a `Call`, and its answers a ClassifyResponse. The REST door speaks the same messages
as JSON (doors/rest.py) and uses the same two conversions, `call_of` and `response_of`.
"""

from __future__ import annotations

from centra.runtime.engine import Engine
from centra.serve.call import Answered, Call, Classifier, Limits, with_headers
from centra.serve.doors import Door
from centra.serve.wire import parsed, parser

SERVICE = "centra.v1.Classifier"


def call_of(request, limits: Limits, deadline: float | None = None) -> Call:
    """A ClassifyRequest as a Call, its counts checked before its inputs are copied."""
    inputs = request.inputs
    limits.check_count(len(inputs))  # O(1) on a parsed message
    limits.check_task_names(len(request.tasks))
    return Call(texts=[item.text for item in inputs], pairs=[item.text_pair for item in inputs],
                tasks=list(request.tasks), max_labels=request.max_labels, deadline=deadline,
                ids=[item.id for item in inputs], top_k=request.top_k, raw_scores=request.raw_scores,
                head=request.head, request_id=request.request_id)


def response_of(answered: Answered):
    """One InputResult per input (ids echoed), one TaskResult per task of its row, in the row's order,
    described by the engine that computed them (version, content id); scores as the call asked (every
    label's, or its top_k with their labels; probabilities or raw logits); a task with a candidate head names
    the head that answered."""
    from centra.serve.v1 import centra_pb2 as pb

    engine, call = answered.engine, answered.call
    response = pb.ClassifyResponse(model_version=engine.version, model_id=engine.content_id)
    for i, row in enumerate(answered.rows):
        entry = response.results.add(id=call.ids[i] if call.ids else "")
        for name in row.tasks:
            task = entry.tasks.add(task=name, truncated=answered.truncated(i, name))
            answered.answer(i, name).to_v1(task)
            if call.top_k:
                del task.scores[:]
                task.top.extend(pb.LabelScore(label=label, score=score) for label, score in answered.top(i, name))
            elif call.raw_scores:
                del task.scores[:]
                task.scores.extend(answered.scores(i, name).values())
            if answered.head(name) is not None:  # set only for a task with a candidate head
                task.head = answered.head(name)
    return response


def tasks_of(engine: Engine):
    """The served model as a ListTasksResponse: its tasks (in serving order), backbone, version, content id
    and overhead."""
    from centra.serve.v1 import centra_pb2 as pb

    manifest = engine.manifest
    backbone = manifest.backbone if manifest is not None else None
    return pb.ListTasksResponse(
        tasks=[pb.TaskInfo(name=s.name, kind=s.kind, labels=s.labels, input=s.input, max_length=s.max_length,
                           attach_layer=s.attach_layer, task_layers=s.task_layers,
                           has_candidate=s.name in engine.candidates) for s in engine.specs.values()],
        backbone_id=backbone.id if backbone else "", backbone_fingerprint=backbone.fingerprint if backbone else "",
        model_version=engine.version, model_id=engine.content_id,
        overhead_layers=manifest.overhead_layers if manifest is not None else 0)


class ClassifierServicer:
    """centra.v1.Classifier: a Call from the request, the classify path, the answers as a response."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    async def Classify(self, request, context):
        import asyncio

        remaining = context.time_remaining()
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        call = with_headers(call_of(request, self.classifier.limits, deadline), context.invocation_metadata() or ())
        return response_of(await self.classifier.classify(call))

    async def ListTasks(self, request, context):
        return tasks_of(self.classifier.engine)


class V1Door(Door):
    name = "centra.v1"
    grpc_services = (SERVICE,)

    def grpc_files(self) -> list:
        from centra.serve.v1 import centra_pb2 as pb

        return [pb.DESCRIPTOR]

    def add_grpc(self, server, classifier: Classifier) -> None:
        """Register the servicer. Unlike the generated add_ClassifierServicer_to_server, requests over the
        limits (never parsed) or that do not parse (bad UTF-8) get INVALID_ARGUMENT, not UNKNOWN."""
        import grpc

        from centra.serve.status import mapped
        from centra.serve.v1 import centra_pb2 as pb

        servicer, limits = ClassifierServicer(classifier), classifier.limits
        counts = {1: (limits.max_inputs, "inputs"), 2: (limits.max_task_names, "task names")}  # ClassifyRequest's
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                mapped(parsed(getattr(ClassifierServicer, name))).__get__(servicer),
                request_deserializer=parser(request, limits.wire_bytes, counted),
                response_serializer=response.SerializeToString)
            for name, request, response, counted in (("Classify", pb.ClassifyRequest, pb.ClassifyResponse, counts),
                                                     ("ListTasks", pb.ListTasksRequest, pb.ListTasksResponse, None))}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)


DOOR = V1Door()
