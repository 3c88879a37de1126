"""The training loop's side: optimizer hooks, GradScaler's skipped steps, gradient rescale."""
