"""KEDA's external scaler protocol (``externalscaler.ExternalScaler``), served by
``bazaar autoscaler --keda``: :mod:`.service` answers it with bazaar's decisions; the
``externalscaler_pb2*`` modules are protoc's output for KEDA's own ``externalscaler.proto``
(``generate.sh``)."""
