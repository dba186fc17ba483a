"""Resolve ``-A module[:attribute]`` or ``-A path/to/file.py[:attribute]`` to an App."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from .app import App
from .errors import ConfigError


class AppImportError(ConfigError):
    """The app's module raised while being imported; carries the traceback to show once."""


def load_app(spec: str) -> App:
    if not spec:
        raise ConfigError("no app given: pass -A module, -A module:app or -A path/to/app.py (or set PIPES_APP)")
    target, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import(target)
    if attr:
        obj = getattr(module, attr, None)
        if obj is None:
            raise ConfigError(f"module {module.__name__!r} has no attribute {attr!r}")
        if callable(obj) and not isinstance(obj, App):
            obj = obj()  # an app factory
        if not isinstance(obj, App):
            raise ConfigError(f"{spec} is a {type(obj).__name__}, not a pipes.App")
        return obj
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if len(apps) == 1:
        return apps[0]
    if not apps:
        raise ConfigError(f"module {module.__name__!r} defines no pipes.App: create one with app = pipes.App('name')")
    raise ConfigError(f"module {module.__name__!r} defines {len(apps)} apps: choose one with -A {target}:NAME")


def _import(target: str):
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.exists(path):
            raise ConfigError(f"no such file: {target}")
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))
        _run(lambda: spec.loader.exec_module(module), target)
        return module
    try:
        importlib.util.find_spec(target)
    except (ModuleNotFoundError, ValueError):
        raise ConfigError(f"cannot find module {target!r} (is it on the path, or did you mean a file?)") from None
    if importlib.util.find_spec(target) is None:
        raise ConfigError(f"cannot find module {target!r} (run from the directory that contains it, "
                          f"or pass a file path)")
    return _run(lambda: importlib.import_module(target), target)


def _run(load, target: str):
    try:
        return load()
    except ConfigError:
        raise
    except Exception as e:
        raise AppImportError(f"importing {target} failed: {type(e).__name__}: {e}") from e
