"""Rerankers that ask a chat model, and the Mem0 LLM wrapper they can run on."""
