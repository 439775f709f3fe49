"""Typed configuration dataclasses. Importable without torch."""
