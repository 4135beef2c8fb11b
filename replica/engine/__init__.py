"""The engine core: scheduler, paged KV block manager, model runner, sampler and output handling."""
