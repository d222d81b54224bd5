"""The built-in strategies. Each module is registered through offloadkit's own entry points
(``[project.entry-points.offloadkit]``), exactly as a third-party plugin would be."""
