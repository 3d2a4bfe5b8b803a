"""Talking to KHEOPS: the HTTP client, STOW-RS encoding and answers, the retry delays."""
