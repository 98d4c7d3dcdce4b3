"""Every patch on vLLM internals, one module per patched vLLM part."""
