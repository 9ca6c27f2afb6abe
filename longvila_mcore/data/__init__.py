"""Data: video decoding, chat template and labels, packing, webdataset pipelines, synthetic data.

A sample travels: `stream` (shards, seeded order) -> `samples` (files to ids, labels, frames:
`media`, `chat`, `layout`) -> `packing` (micro-batches of `batch.Batch`), driven by `pipeline`
(`build_pipeline`, the training loop's entry point). `tokenizer` holds the token facts,
`synthetic` the embedded default dataset; FORMAT.md describes the shards.
"""
