"""Operating workers: the ``dlq``, ``topics`` and ``deploy`` commands and the progress line."""
