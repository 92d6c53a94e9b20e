"""The `align` command."""
