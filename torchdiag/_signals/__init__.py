"""Signals that precede divergence: attention, output logits, Adam's epsilon; the watch's instability side."""
