"""Composition root: configuration, the Engine facade, the REST app and the CLI."""
