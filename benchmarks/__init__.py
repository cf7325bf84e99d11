"""Throughput and quality harnesses; they write JSON and a readable report."""
