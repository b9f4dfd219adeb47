"""Benchmarks and chaos runs: scripts that print JSON figures, run by hand (never part of CI's test time)."""
