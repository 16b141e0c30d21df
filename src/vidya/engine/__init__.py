"""The engine: request state, block pool and prefix cache, scheduler, model runner, sampler,
detokenizer, and the loop that ties them together."""
