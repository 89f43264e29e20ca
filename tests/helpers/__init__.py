"""Shared test helpers (datasets, subprocess runners); test modules import from here, not from each other."""
