"""Model configs, the bidirectional decoder and checkpoint I/O."""
