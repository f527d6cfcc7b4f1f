"""Serving beyond one vLLM process: what crosses process boundaries (wire), the document
store of full-resolution embedder outputs (store), and the Ray deployments built on them."""
