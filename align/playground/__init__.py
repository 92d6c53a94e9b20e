"""Trying entries by hand: the terminal chat."""
