"""A corpus of hostile requests, generated at test time (no binary blobs in the repo)."""
