"""Training: losses (chunked fp32 cross-entropy, DPO/IPO), the pure train step, metrics, and the loop."""
