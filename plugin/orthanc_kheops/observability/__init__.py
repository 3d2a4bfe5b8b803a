"""Metrics, transfer statistics, audit lines and the masking of secrets."""
