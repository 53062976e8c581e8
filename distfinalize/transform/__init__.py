"""Per-tensor transforms between the checkpoint and the output: names, rotary layout, vocabulary rows, casts,
quantization."""
