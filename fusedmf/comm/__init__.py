"""Communication layer (bucketed, compressed gradient allreduce fused with the update)."""
