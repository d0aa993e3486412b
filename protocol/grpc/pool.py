"""The descriptor pool of bazaar's copy of Triton's gRPC protocol, apart from protobuf's
default pool, where another copy (tritonclient's) may already have registered the same
message names."""

from google.protobuf.descriptor_pool import DescriptorPool

POOL = DescriptorPool()
