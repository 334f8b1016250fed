"""Deployment back ends: write a qgraph Graph in an inference engine's own model format."""
