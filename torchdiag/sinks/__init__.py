"""Sinks only write: console warnings and TensorBoard."""
