"""Training utilities: per-iteration schedules and optimizer parameter groups."""
