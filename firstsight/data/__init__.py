"""Data: egocentric QA samples and their batching."""
