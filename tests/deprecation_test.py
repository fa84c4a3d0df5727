"""The one deprecation mechanism: old names keep working, warn, and name the new spelling."""

import types
import warnings

import pytest

from ringattn import deprecation


def _new(x, *, scale=1):
    return x * scale


def test_alias_warns_and_calls_the_new_function():
    old = deprecation.alias(_new, "ringattn.old_fn")
    with pytest.warns(DeprecationWarning, match=r"ringattn.old_fn is deprecated .* use .*_new"):
        assert old(3, scale=2) == 6


def test_renamed_keywords():
    fn = deprecation.renamed_keywords({"factor": "scale"})(_new)
    with pytest.warns(DeprecationWarning, match=r"_new\(factor=...\).*`scale`"):
        assert fn(3, factor=5) == 15
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fn(3, scale=4) == 12  # the new keyword does not warn
    with pytest.raises(TypeError, match="both `factor`"):
        fn(3, factor=5, scale=4)


def test_moved_names():
    getattr_ = deprecation.moved("ringattn.old_module", {"Old": "ringattn.deprecation:alias"})
    module = types.ModuleType("ringattn.old_module")
    module.__getattr__ = getattr_
    with pytest.warns(DeprecationWarning, match="ringattn.old_module.Old .* ringattn.deprecation"):
        assert module.Old is deprecation.alias
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        module.Missing  # noqa: B018
