"""The server: an engine batching requests across adapters, the adapter registry and the OpenAI-compatible API."""
