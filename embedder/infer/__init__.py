"""Run a graph: devices and sessions, tokenizer, token-budget batches, the window embedder (never imports torch)."""
