"""The packed CPU engines: one module per model family (``qwen3``, ``bert``) over the
prepacked ``linear`` layers, with token-budget ``batching`` and the ``cpu`` feature probes.

Nothing here imports a backend; torch is imported inside functions only."""
