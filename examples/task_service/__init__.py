"""An example service on aura-pg: tasks assigned to agents (README.md)."""

from .aggregate import Task
from .service import TaskService

__all__ = ["Task", "TaskService"]
