"""Data passed between steps: PipelineData and its input bindings."""
