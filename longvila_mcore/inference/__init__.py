"""Generation: a prompt prefilled over the sequence-parallel ranks (session), decoded with a
sharded KV cache; sampling, stop strings and streamed text (sampling)."""
