"""Small bundled datasets (JSONL), read through :mod:`latentembed.training.data`."""
