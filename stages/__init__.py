"""One module per DVC stage: `run(params) -> metrics` plus `python -m stages.<name>` reading params.yaml."""
