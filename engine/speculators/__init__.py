"""engine/speculators."""
