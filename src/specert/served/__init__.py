"""Served models: a client of OpenAI-compatible inference servers (vLLM first) and the engine cross-check, which
reads an engine's own speculative-decoding counters and replays its proposer on the same greedy text."""
