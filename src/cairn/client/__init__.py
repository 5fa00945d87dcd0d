"""The client API: workspace, experiments, runs, pipeline authoring. Users import from ``cairn``."""
