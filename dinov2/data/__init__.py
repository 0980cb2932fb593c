"""Data pipeline: augmentations, iBOT masking, collation, datasets, samplers and loaders."""
