"""Training objectives as pure tensor functions, each golden-tested."""
