"""Phantoms, sample requests and metrics for tests, samples and benchmarks; never imported by serving code."""
