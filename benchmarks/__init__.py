"""Benchmark harness for speculative-decoding methods in vLLM (run: python -m benchmarks.run)."""
