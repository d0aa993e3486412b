#!/usr/bin/env bash
# Regenerates the Python modules of KEDA's external scaler protocol (make grpc-protos).
# externalscaler.proto is kedacore/keda's pkg/scalers/externalscaler/externalscaler.proto at
# 8b4f083 (2026-08-20), unchanged. Pinned generator: grpcio-tools 1.85.1, as for
# protocol/grpc/.
#
# One edit follows protoc: the service module imports the messages as an autoscaler.keda
# module. The messages register in protobuf's default descriptor pool: nothing else in a
# bazaar process defines the package `externalscaler`.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    externalscaler.proto
sed -i 's/^import externalscaler_pb2 as/from autoscaler.keda import externalscaler_pb2 as/' \
    externalscaler_pb2_grpc.py
