"""Command lines over dipddpm.launch: `python -m launch.submit`, `python -m launch.status`."""
