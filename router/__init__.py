"""The fleet's router: one OpenAI-compatible endpoint in front of many replicas.

It balances by health, queue depth and prefix-cache affinity, streams SSE through untouched,
retries only before the first byte reached the client, and enforces the control plane's API keys
and limits. It imports fleet.control (membership, keys, errors) and never the replica package.
"""
