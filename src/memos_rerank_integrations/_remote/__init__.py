"""Remote backends: the shared base (limits, retries, keys), the HTTP transport and
its deadline, the bound on the JSON items of an answer (``json_bounds``), and one
module per service (MemOS, Cohere, Zero Entropy, any HTTP reranker)."""
