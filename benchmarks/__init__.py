"""embedrt's benchmark suite: side by side with sentence-transformers, speed and quality together."""
