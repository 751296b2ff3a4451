"""Benchmarks: training on the real datasets (datasets), serving throughput (serving), whole scenes
through Triton (scene) and training quality against a peer script (quality). Each prints its figures;
none is a test."""
