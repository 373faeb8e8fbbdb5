"""Export, exporting only: the merged model for other runtimes (ONNX graphs, int8, TensorRT plans, Triton
repositories), each checked against PyTorch where it is written, and the engine steps a merge runs
(engines). Measuring what was exported (benchmarks, scale, the tritonserver launcher) lives in
centra.measure. Imports the core and the runtime; onnx, onnxruntime and tensorrt only inside functions."""
