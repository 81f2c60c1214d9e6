"""Registry exceptions."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every registry error."""


class TaskNotFound(RegistryError, LookupError):
    """No task of that name."""


class TaskExists(RegistryError):
    """A task of that name already exists."""


class VersionNotFound(RegistryError, LookupError):
    """The task has no such version."""


class InvalidName(RegistryError, ValueError):
    """A task name outside `^[a-z0-9][a-z0-9._-]{0,63}$`."""


class IntegrityError(RegistryError):
    """A stored prompt file is missing or does not match its sha256."""


class InvalidPrompt(RegistryError, ValueError):
    """A prompt whose shape does not fit the task (e.g. another hidden size)."""
