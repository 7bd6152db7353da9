"""Tracking a training run: MFU arithmetic, metrics.jsonl and loss.png, W&B, and the Trainer callback."""
