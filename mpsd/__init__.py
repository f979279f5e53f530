"""mpsd: many small LLM engines on one GPU host under NVIDIA MPS, behind one proxy."""

__version__ = "0.1.0"
