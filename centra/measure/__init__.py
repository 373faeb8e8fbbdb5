"""Measuring, over the other layers: benchmarks in process (bench: the engines, bench_engines, bench_batches),
against a server (bench_server, its clients in bench_clients, and tritonserver, the Triton launcher) and at
scale (scale, scale_probe, bench_reload); the soak of a running server through every door (soak,
soak_calls, soak_doors, soak_slow, soak_check, soak_control); multilabel decision rules (multilabel); many
languages on one trunk (umsab, languages, probe, deploy); the GLUE tables (results); processes' resident
memory (memory). It may import every layer but the CLI, grpc, aiohttp, onnx, onnxruntime and tensorrt only
inside functions; only the CLI (and tests, tools) import it."""
