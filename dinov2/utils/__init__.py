"""Small utilities: configuration, logging, seeding."""
