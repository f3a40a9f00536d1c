"""``lorakit ui``: a local web dashboard over a runs directory: launch, watch and compare runs, chat with the
base model and any run's adapter side by side, inspect adapters. ``create_app`` builds the FastAPI app."""

from .app import create_app
from .runs import Workspace

__all__ = ["Workspace", "create_app"]
