"""The embedded default, built offline: the corpus, the tiny model and tokenizer, the synthetic pre-training mix,
the LongQA and LongBench-format sets, and the probes that show whether a model uses its context."""
