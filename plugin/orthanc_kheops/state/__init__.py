"""Durable state: the outbox of instances to send and the switching rules with their share jobs."""
