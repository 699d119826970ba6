"""Resolve a model and read its sentence-transformers pipeline into a ModelSpec (no torch)."""
