"""The bazaar autoscaler: signals, the scaling policy, scaler backends, the simulator."""
