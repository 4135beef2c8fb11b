"""The replica's OpenAI-compatible HTTP server (starlette + uvicorn) over one AsyncEngine.

A request's path: app (routes, request counting) -> completions / chat (validate with protocol,
tokenize with prompts, admit with auth) -> generation (engine streams, metrics, in-flight count)
-> responses (OpenAI bodies and chunks) -> sse (framing, disconnect = abort). runtime holds the
engine and the replica's life (load, fleet membership, drain); serve runs it under uvicorn with a
graceful SIGTERM. Imported only when serving: `from replica import LLM` never loads it.
"""
