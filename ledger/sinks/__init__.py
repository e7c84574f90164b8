"""Destinations of the outbox: one small module per sink."""
