"""distfinalize: sharded training checkpoints -> Hugging Face model directories, every rank at once."""

__version__ = "0.1.0"
