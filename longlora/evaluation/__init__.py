"""Evaluation: loading a model as the evaluation stages do, perplexity, passkey, LongBench, held-out QA, the report."""
