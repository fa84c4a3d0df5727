"""The one way ringattn renames things: the old name keeps working for one release and warns.

A renamed function or class: `old = deprecation.alias(new, "ringattn.decode.old", "0.3")`.
A renamed keyword: `@deprecation.renamed_keywords({"old": "new"}, "0.3")` on the function.
A moved module or name: in the old module, `__getattr__ = deprecation.moved(__name__, {...})`.
A renamed config field: `deprecation.warn("model.attention.old", "model.attention.new", "0.3")`
where the config is read.

Every warning is a `DeprecationWarning` that names the old and the new spelling and the release
that removes the old one, raised at the caller's line.
"""

from __future__ import annotations

import functools
import importlib
import warnings

# The release that drops what is deprecated now.
REMOVED_IN = "0.3"


def warn(old, new, removed_in=REMOVED_IN, stacklevel=3):
    """Warn that `old` is deprecated in favour of `new`."""
    warnings.warn(
        f"{old} is deprecated and will be removed in ringattn {removed_in}; use {new}.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def alias(new, old_name, removed_in=REMOVED_IN):
    """A callable `old_name` that warns once per call and calls `new`."""
    new_name = f"{new.__module__}.{new.__qualname__}"

    @functools.wraps(new)
    def old(*args, **kwargs):
        warn(old_name, new_name, removed_in)
        return new(*args, **kwargs)

    old.__doc__ = f"Deprecated alias of `{new_name}` (removed in {removed_in})."
    return old


def renamed_keywords(renames, removed_in=REMOVED_IN):
    """Decorator: keyword `old` (a key of `renames`) is accepted as `renames[old]`, with a
    warning; both at once is a TypeError."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__name__}: got both `{old}` (deprecated) and `{new}`; "
                            f"pass `{new}` only."
                        )
                    warn(f"{fn.__name__}({old}=...)", f"`{new}`", removed_in)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def moved(module_name, names, removed_in=REMOVED_IN):
    """A module `__getattr__` for names that moved: {old name: "new.module:new_name"}. The new
    module is imported only when an old name is used."""

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        path, _, new_name = names[name].partition(":")
        warn(f"{module_name}.{name}", f"{path}.{new_name or name}", removed_in)
        return getattr(importlib.import_module(path), new_name or name)

    return __getattr__
