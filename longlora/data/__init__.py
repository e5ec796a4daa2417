"""Data: readers for local files and hub datasets, batch tokenization, packing into blocks, SFT examples."""
