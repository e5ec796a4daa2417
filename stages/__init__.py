"""One module per DVC stage: `run(params) -> metrics` plus `python -m stages.<name>` reading params.yaml.

Every `run` first claims its outputs (`with params.output("<stage>") as out:`): the output folder and metrics file
are checked and locked before any work, published with `out.publish()` and `out.write_metrics()`, and nothing the
stage did not write is ever replaced (longlora/io.py; docs/safety.md).
"""
