"""Remote backends: the shared base (limits, retries, keys), the HTTP transport and
its deadline, and one module per service (MemOS, Cohere, Zero Entropy, any HTTP reranker)."""
