"""Checkpoint conversion: PyTorch files -> dfjax model folders. Key maps and layout transposes live here only."""
