"""specstream-vllm: Speculative Streaming (arXiv 2402.11131) as a vLLM speculative method."""

__version__ = "0.1.0"
METHOD = "specstream"
