"""Forwarding: the workers that send queued instances, and the health of the link to KHEOPS."""
