"""Runs ONE step job anywhere: materialise the snapshot, resolve inputs, run, capture, commit."""
