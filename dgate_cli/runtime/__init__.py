"""The gated module: its execution plan, decisions, loading an export, and optional backends."""
