"""Checkpoints: distributed save / load / resume, and the HF (VILA layout) <-> Megatron mapping."""
