"""Training: losses, data loading, the loop, run state."""
