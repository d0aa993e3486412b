"""The bazaar gateway: the Open Inference Protocol front door, dynamic batching and routing."""
