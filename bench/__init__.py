"""Measurements of the agent, the kernel program and the operator: `make bench`."""
