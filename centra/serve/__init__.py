"""The serving layer: the gRPC servicer (server), pb conversion (convert), the batcher, the client, and
the generated stubs (v1). Imports runtime and core; grpc only inside functions, except in the stubs."""
