"""Errors users see."""


class PipesError(Exception):
    """Base of pipes' own errors."""


class ConfigError(PipesError, ValueError):
    """The app or the command line asks for something that cannot work; says how to fix it."""


class ProcessingError(PipesError):
    """A node failed on a message and its policy is to stop."""


class BrokerError(PipesError):
    """The broker cannot be reached, opened or used."""
