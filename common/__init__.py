"""Utilities below every other package (``data``, ``models``, ``analysis``, the commands): file I/O."""
