"""The plant simulator: deterministic, physically plausible signals with labeled faults."""
