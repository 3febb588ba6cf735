"""The hive coordinator, as a package: see ``core`` for how a round goes."""

from .config import HiveConfig
from .core import COORDINATOR, Coordinator, add_routes
from .limits import Limits

__all__ = ["COORDINATOR", "Coordinator", "HiveConfig", "Limits", "add_routes"]
