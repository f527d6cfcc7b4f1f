"""Extensible Embedding for vLLM."""
