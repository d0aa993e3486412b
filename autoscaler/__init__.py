"""The bazaar autoscaler: signals, the scaling policy, the control loop and its Kubernetes scaler;
``autoscaler.simulation`` is the benchmark tool beside them."""
