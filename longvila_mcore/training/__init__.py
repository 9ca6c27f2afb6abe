"""Training components: optimizer, learning-rate schedule, metrics."""
