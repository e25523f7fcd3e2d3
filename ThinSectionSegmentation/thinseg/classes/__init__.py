"""Mineral classes: `table` (ClassTable, colours) and `files` (class and colour tables read from CSV)."""
