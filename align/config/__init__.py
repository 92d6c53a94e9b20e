"""Recipes: the typed schema, loading with every error at once, and the shipped catalog."""
