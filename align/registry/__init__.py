"""The model registry: named, versioned entries with lineage, hashes and integrity checks."""
