"""Plumbing: the process environment, signals, JSON files and stable hashes."""
