"""The serving layer, serving only: one call type and one classify path (call), the doors that build it
from their wire formats (doors/: centra.v1 over gRPC, REST, the Open Inference Protocol over gRPC and
HTTP, and the Triton python-backend model), the server that hosts them on a gRPC and an HTTP port
(server, http), one guard for token and metrics (guard, metrics, security), the batcher, reload, memory
release, a server in a background thread (background), and the generated stubs (v1, inference). The
client is centra.client. Benchmarks and the soak that drive a server live in centra.measure. Imports
runtime and core; grpc and aiohttp only inside functions, except in the stubs."""
