"""Load tests and the benchmark that compares bazaar with raw ONNX Runtime and reference servers."""
