"""The replica's OpenAI-compatible HTTP API (starlette, run by uvicorn) over one AsyncEngine.

A request's path: app (routes, request counting) -> completions / chat (validate with protocol,
tokenize with prompts, admit with auth) -> generation (engine streams, metrics, in-flight count)
-> responses (OpenAI bodies and chunks) -> sse_response (framing; disconnect.py: a client that
leaves aborts its request). runtime holds the engine and the replica's life (load, fleet
membership, drain); uvicorn_runner runs the app under uvicorn with a graceful SIGTERM. Imported
only when serving: `from replica import LLM` never loads it.
"""
