"""Online stages' shared parts: generation (left-padded, stop at EOS), reward sources, and rollout batches."""
