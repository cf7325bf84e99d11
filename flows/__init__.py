"""Bytewax dataflows of twinflow; each is built by a factory from the settings."""
