"""Generated gRPC stubs of centra/protos/centra/v1/centra.proto (package centra.v1): run tools/gen_protos.py to
regenerate, never edit them by hand. Only centra_pb2_grpc imports grpc at module level."""
