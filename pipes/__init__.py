"""pipes: Kafka Streams-style stream processing for Python.

``import pipes`` has no side effects: no event loop, no argument parsing.
"""

from . import io, windows
from .app import App, Topic
from .errors import BrokerError, ConfigError, PipesError, ProcessingError
from .message import Message
from .serializers import Serializer
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "App",
    "BrokerError",
    "ConfigError",
    "Message",
    "PipesError",
    "ProcessingError",
    "Serializer",
    "Settings",
    "Topic",
    "io",
    "windows",
]
