"""Benchmarks: the XDP relay against the userspace relay and plain kernel routing, side by side in one run."""
