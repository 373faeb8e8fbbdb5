"""gRPC server reflection, v1 and v1alpha, over every service the server opens: the doors' (centra.v1,
the Open Inference Protocol's inference.GRPCInferenceService), health and reflection itself; each file
resolvable by name or by any symbol in it (`file_containing_symbol`), with its dependencies.

grpcio-reflection (1.85, the newest release) serves only `grpc.reflection.v1alpha`; clients such as
grpcurl and Postman ask for `grpc.reflection.v1` first. The two protocols' messages are the same (v1 is
v1alpha under a stable package name, field for field), so the library's servicer answers both: v1alpha
as the library registers it, v1 through a handler of its own that speaks the same bytes. For v1's
service to resolve as a symbol too, its file descriptor is v1alpha's with the package renamed.

The descriptors live in one pool made for reflection: the OIP stubs keep theirs in a private pool (see
tools/gen_protos.py), so protobuf's default pool alone cannot resolve `inference.*`. grpc is imported
inside functions."""

from __future__ import annotations

V1 = "grpc.reflection.v1"
V1ALPHA = "grpc.reflection.v1alpha"
SERVICE_V1 = f"{V1}.ServerReflection"
SERVICE_V1ALPHA = f"{V1ALPHA}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"  # the upstream file's name


def reflection_pool(files):
    """A descriptor pool holding `files` (protobuf FileDescriptors, from any pool) and everything they
    import, plus reflection v1's file."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # imports first: a pool refuses a file whose imports it lacks
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in (*files, reflection_pb2.DESCRIPTOR):
        add(file)
    pool.Add(v1_file(reflection_pb2.DESCRIPTOR))
    return pool


def v1_file(v1alpha):
    """Reflection v1's FileDescriptorProto: v1alpha's under package grpc.reflection.v1 (its messages and
    service unchanged, as in the upstream v1 proto)."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.CopyToProto(proto)
    old, new = f".{V1ALPHA}.", f".{V1}."
    proto.name, proto.package = V1_FILE, V1
    proto.ClearField("options")  # v1alpha's say deprecated, and name v1alpha's Java and Go packages
    proto.options.java_package, proto.options.java_multiple_files = "io.grpc.reflection.v1", True
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for item in message.field:
            if item.type_name.startswith(old):
                item.type_name = new + item.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return proto


def enable_reflection(server, services, files) -> None:
    """Serve reflection v1 and v1alpha on a grpc.aio server (before it starts): `services` (full names)
    and the two reflection services are listed; `files` (FileDescriptors) and their imports resolve."""
    import grpc
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    names = (*services, SERVICE_V1, SERVICE_V1ALPHA)
    servicer = reflection.aio.ReflectionServicer(names, pool=reflection_pool(files))
    for service in (SERVICE_V1ALPHA, SERVICE_V1):  # the same messages on the wire, the same servicer
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo":
                                                                                     handler}),))
