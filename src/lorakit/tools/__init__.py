"""Measurement programs built on the trainer and the library: ``benchmark`` (lorakit bench) and ``compare``."""
