"""The method: S²-Attn, position interpolation, LoRA+, the training core, and the extended models it writes."""
