"""Evaluation: perplexity by context length (PG19-style) and pass-key retrieval."""
