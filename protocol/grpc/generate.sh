#!/usr/bin/env bash
# Regenerates the Python modules of Triton's gRPC protocol (make grpc-protos). The .proto files
# are triton-inference-server/common's protobuf/ at 83adf7c, unchanged. Pinned generator:
# grpcio-tools 1.85.1 (protoc for protobuf 6.33/7.x gencode).
#
# Two edits follow protoc, both so that a process can hold these messages next to another
# copy of the same protocol (tritonclient's, in the tests): the modules register into
# protocol.grpc.pool's own descriptor pool, not protobuf's default one (where the second
# `inference.ModelInferRequest` would be a duplicate symbol), and they import each other as
# protocol.grpc modules.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    model_config.proto grpc_service.proto
rm model_config_pb2_grpc.py  # model_config.proto declares no service
for module in model_config_pb2.py grpc_service_pb2.py; do
    sed -i \
        -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$/from protocol.grpc.pool import POOL as _pool/' \
        -e 's/_descriptor_pool.Default()/_pool/' \
        "$module"
done
sed -i 's/^import model_config_pb2 as/from protocol.grpc import model_config_pb2 as/' \
    grpc_service_pb2.py grpc_service_pb2.pyi
sed -i 's/^import grpc_service_pb2 as/from protocol.grpc import grpc_service_pb2 as/' \
    grpc_service_pb2_grpc.py
