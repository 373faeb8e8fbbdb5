"""gRPC discovery as an outside client sees it: server reflection v1 and v1alpha list every service (the
doors', health, reflection), each resolvable by symbol into files that build a working descriptor pool
(health per service: test_doors.py).

The client is raw: a bidirectional stream opened by method path on a plain channel, the messages encoded
with the reflection proto's message classes (the same bytes for v1 and v1alpha), so nothing of
grpc_reflection's servicer or its client-side descriptor database is used to check the server."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from centra.serve.guard import Guard
from centra.serve.server import CentraServer, ServeOptions

SERVICES = {"centra.v1.Classifier": {"Classify", "ListTasks"},
            "inference.GRPCInferenceService": {"ServerLive", "ServerReady", "ServerMetadata", "ModelReady",
                                               "ModelMetadata", "ModelInfer"},
            "grpc.health.v1.Health": {"Check", "Watch"},
            "grpc.reflection.v1.ServerReflection": {"ServerReflectionInfo"},
            "grpc.reflection.v1alpha.ServerReflection": {"ServerReflectionInfo"}}
VERSIONS = ("v1", "v1alpha")


def ask(channel, version: str, requests: list, metadata=()) -> list:
    """One reflection stream: the requests in, one response per request out."""
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=rpb.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=20, metadata=metadata))


def pool_of(responses) -> descriptor_pool.DescriptorPool:
    """A fresh pool built from the FileDescriptorProtos the server sent (imports added before their users)."""
    files = {}
    for response in responses:
        assert response.WhichOneof("message_response") == "file_descriptor_response", response
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
    pool, added = descriptor_pool.DescriptorPool(), set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    return pool


@pytest.mark.parametrize("version", VERSIONS)
def test_reflection_lists_and_resolves_every_service(running, version):
    channel = running.channel
    [listed] = ask(channel, version, [rpb.ServerReflectionRequest(list_services="*")])
    names = {s.name for s in listed.list_services_response.service}
    assert names == set(SERVICES), names
    requests = [rpb.ServerReflectionRequest(file_containing_symbol=name) for name in sorted(names)]
    responses = ask(channel, version, requests)
    for name, response in zip(sorted(names), responses):
        pool = pool_of([response])  # each answer carries its file and every file it imports
        assert SERVICES[name] <= set(pool.FindServiceByName(name).methods_by_name), name
    # a message type resolves too, and a file by its name
    [infer] = ask(channel, version, [rpb.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest")])
    fields = pool_of([infer]).FindMessageTypeByName("inference.ModelInferRequest").fields_by_name
    assert {"model_name", "inputs", "raw_input_contents"} <= set(fields)
    [by_name] = ask(channel, version, [rpb.ServerReflectionRequest(file_by_filename="centra/v1/centra.proto")])
    assert pool_of([by_name]).FindMessageTypeByName("centra.v1.ClassifyRequest")
    [missing] = ask(channel, version, [rpb.ServerReflectionRequest(file_containing_symbol="no.such.Service")])
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_v1_file_is_its_own_package(running):
    """v1's service resolves to a file of package grpc.reflection.v1, whose method types are v1's own."""
    [response] = ask(running.channel, "v1",
                     [rpb.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")])
    method = pool_of([response]).FindServiceByName("grpc.reflection.v1.ServerReflection").methods_by_name[
        "ServerReflectionInfo"]
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert method.containing_service.file.name == "grpc/reflection/v1/reflection.proto"


def test_reflection_takes_the_token_as_other_calls_do(engine):
    from test_rest import Served

    running = Served(CentraServer(engine, ServeOptions(port=0, http_port=0, drain_s=0), guard=Guard(token="s3cret")))
    try:
        for version in VERSIONS:
            with pytest.raises(grpc.RpcError) as err:
                ask(running.channel, version, [rpb.ServerReflectionRequest(list_services="*")])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            [listed] = ask(running.channel, version, [rpb.ServerReflectionRequest(list_services="*")],
                           metadata=(("authorization", "Bearer s3cret"),))
            assert {s.name for s in listed.list_services_response.service} == set(SERVICES)
    finally:
        running.close()
