"""Compute targets: where step jobs run. Each kind implements the small ``Compute`` protocol."""
