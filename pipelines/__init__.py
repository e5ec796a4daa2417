"""Prefect flows over the stages in `stages/`."""
