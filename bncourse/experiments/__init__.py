"""Experiments of the book, one module per chapter; each returns plain data."""
