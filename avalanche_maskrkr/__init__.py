"""RKR, Piggyback and Mask-RKR for Avalanche."""
