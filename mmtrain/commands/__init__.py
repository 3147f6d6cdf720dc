"""The commands that use finished runs and data: one module per command (the `mmtrain`
entry point, cli.py, dispatches to them)."""
