"""The Kubernetes seam: the one package that imports ``kubernetes``.

``api`` owns the connection (the client, the one retry policy, the RBAC permission log);
``deployments`` is what the autoscaler reads and scales, ``endpoints`` what the gateway
routes to. Both hand back plain values, so nothing above this package sees the client's
types, and each module's ``*_RBAC`` set is exactly what its calls need.
"""
