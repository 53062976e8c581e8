"""Per-tensor transforms between the checkpoint and the output: names, casts, ties."""
