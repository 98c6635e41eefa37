"""Metrics, health, traces and logs for aura-pg processes."""
