"""longlora: extend the context window of pre-trained LLMs the LongLoRA way (S²-Attn, position interpolation, LoRA+).

The library imports neither DVC nor Prefect; the pipeline around it lives in `stages/` and `pipelines/`.
"""

__version__ = "0.1.0"
