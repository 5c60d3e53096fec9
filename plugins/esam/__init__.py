"""ESAM master-station security functions (plugin type ``esam``): see README.md beside this file."""

from .plugin import EsamConfig, EsamPlugin

__all__ = ["EsamConfig", "EsamPlugin"]
