"""Generated gRPC stubs of centra/protos/inference/open_inference_grpc.proto (the Open Inference Protocol,
KServe v2, package `inference`): run tools/gen_protos.py to regenerate, never edit them by hand. Their
descriptors live in a pool of their own (`open_inference_grpc_pb2.POOL`), not protobuf's default pool, so
they load beside tritonclient's stubs of the same messages. Only the _grpc module imports grpc at module
level."""
