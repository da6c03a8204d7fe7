"""What the tests share: fakes and helpers, one module per kind.

- :mod:`.backends`: small deterministic rerankers for the adapter tests (no model, no
  network), the MemOS documentation's examples and the environment of child processes;
- :mod:`.loopback`: a scripted HTTP server on 127.0.0.1 and the services' answer shapes;
- :mod:`.remote`: the four remote backends as the contract tests see them;
- :mod:`.server`: a stand-in model and a live uvicorn for the server tests;
- :mod:`.offline`: Mem0's offline settings and a network guard;
- :mod:`.qwen_fixtures`: the tiny offline Qwen3-Reranker and the model card's recipe;
- :mod:`.checkpoints`: copies of saved checkpoints without some weights or with another
  config;
- :mod:`.pickle_child`, :mod:`.qwen_memory_child`: code run in child processes.
"""
