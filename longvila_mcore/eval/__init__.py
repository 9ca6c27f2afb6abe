"""Evaluation: the video needle-in-a-haystack test (V-NIAH, `python -m longvila_mcore.eval.needle`)."""
