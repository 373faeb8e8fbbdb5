"""The serving layer: the gRPC servicer (server), pb conversion (convert), the batcher, the client, and
the generated stubs (v1); REST JSON and the Open Inference Protocol over HTTP (http, openapi), OIP's
tensors and gRPC servicer (oip, stubs in inference), and the same door as a Triton python-backend model
(triton_backend). Imports runtime and core; grpc and aiohttp only inside functions, except in the stubs."""
