"""The commit: staging dir, rank 0's finishing writes, the kept checkpoint and the manifest."""
