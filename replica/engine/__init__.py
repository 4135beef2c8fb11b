"""The engine: requests in, tokens out, for one model on one GPU or CPU.

`core.EngineCore` runs one scheduled model step at a time (scheduler, paged KV block manager, model
runner, sampler, detokenizer). Two front-ends drive it: `llm.LLM` in the caller's thread (offline
batches) and `async_engine.AsyncEngine` in a step thread of its own (the HTTP server). Its
vocabulary (`config`, `sampling_params`, `outputs`) lives here too, so the engine imports nothing
from the server or the package root.
"""
