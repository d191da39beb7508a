"""Batched structure relaxation with per-system optimizer state and in-flight refill."""
