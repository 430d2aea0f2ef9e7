"""Pure renderers: configuration file content from the inventory (golden-file tested)."""
