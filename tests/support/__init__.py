"""Shared test helpers: free ports, waiting, the exporter as a real subprocess."""
