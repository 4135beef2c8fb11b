"""Requests no replica can take now wait here, fairly across API keys, instead of a 503."""
