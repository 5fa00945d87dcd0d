"""Environment specs and their digests (uv-built environments come with a later issue)."""
