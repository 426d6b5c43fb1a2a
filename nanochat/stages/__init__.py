"""One module per pipeline stage; each runs as `python -m nanochat.stages.<name>` or under torchrun."""
