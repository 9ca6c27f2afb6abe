"""The LongVILA model as Megatron-Core modules: SigLIP tower, projector, Qwen2 decoder."""
