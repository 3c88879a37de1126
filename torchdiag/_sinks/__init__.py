"""Sinks: console warnings and TensorBoard (its event files), and publishing a completed step to them."""
