"""The machine: precision from what it multiplies natively, processes, disk space."""
