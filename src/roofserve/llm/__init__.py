"""Llama-family chat models: loading, a gpt-fast-style decode loop, and an OpenAI-compatible API."""
