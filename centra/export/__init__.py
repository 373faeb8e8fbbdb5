"""Export: the merged model for other runtimes (ONNX graphs, int8), each checked against PyTorch where it is
written. Imports the core and the runtime; onnx and onnxruntime only inside functions."""
