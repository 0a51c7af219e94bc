"""Tasks: one module per `task=` option."""
