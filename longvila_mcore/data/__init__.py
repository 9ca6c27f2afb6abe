"""Data: video decoding, chat template and labels, packing, webdataset pipelines, synthetic data."""
