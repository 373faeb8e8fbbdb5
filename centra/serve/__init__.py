"""The serving layer, serving only: the doors (the centra.v1 gRPC servicer in server, pb conversion in
convert, generated stubs in v1; REST JSON and the Open Inference Protocol over HTTP in http and openapi;
OIP's tensors and gRPC servicer in oip, stubs in inference; the same door as a Triton python-backend model
in triton_backend), the app that plugs them together, the batcher, reload, auth (security), metrics and
memory release; a server in a background thread (background). The client is centra.client. Benchmarks and
the soak that drive a server live in centra.measure. Imports runtime and core; grpc and aiohttp only inside
functions, except in the stubs."""
