"""Local backends: Qwen3-Reranker, cross-encoders and embedding similarity, with
what they share (the encoder base, device/dtype and the model cache, bounded tokenization)."""
