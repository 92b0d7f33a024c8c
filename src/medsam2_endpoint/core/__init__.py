"""The Service API every adapter calls, the model registry, settings and the per-request budget."""
