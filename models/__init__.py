"""The model-serving pod: model repository, ONNX Runtime sessions, the pod's v2 server."""
