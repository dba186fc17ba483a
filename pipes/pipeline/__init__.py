"""YAML pipelines in the Redpanda Connect layout (``input``, ``pipeline.processors``,
``output``), compiled into ordinary pipes Apps. See docs/pipelines.md."""

from .compile import Compiled, compile_pipeline, load

__all__ = ["Compiled", "compile_pipeline", "load"]
