"""Switching albums: the condition language, the rules, and the worker that shares series."""
