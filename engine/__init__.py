"""sift: choose the data to fine-tune language models on, on Ray."""

__version__ = "0.1.0"
