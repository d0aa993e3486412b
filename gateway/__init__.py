"""The bazaar gateway: the Open Inference Protocol front door, dynamic batching and routing."""

__version__ = "0.1.0"
