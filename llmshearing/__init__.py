"""llmshearing: targeted structured pruning of LLaMA-family models on Composer.

Three folders at the top of the repository install inside this package (pyproject's package-dir): callbacks/ as
`llmshearing.callbacks`, data_prep/ as `llmshearing.data_prep` and yamls/ as `llmshearing.recipes`, so the wheel adds
no generic top-level names. In a source checkout (no install, or an editable one of another checkout) the finder
below resolves those names to the folders beside this package, so both run the same code under the same names."""
import importlib.util as _util
import os as _os
import sys as _sys

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_BESIDE = {f"{__name__}.{name}": _os.path.join(_os.path.dirname(_HERE), folder)
           for name, folder in (("callbacks", "callbacks"), ("data_prep", "data_prep"), ("recipes", "yamls"))
           if not _os.path.isdir(_os.path.join(_HERE, name))}  # installed (or linked): the normal import finds it


class _SourceCheckout:
    """A meta path finder for the folders of `_BESIDE` in a source checkout (first, before an editable install's)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = _BESIDE.get(name)
        if folder is None or not _os.path.isfile(_os.path.join(folder, "__init__.py")):
            return None
        return _util.spec_from_file_location(name, _os.path.join(folder, "__init__.py"),
                                             submodule_search_locations=[folder])


if _BESIDE and _SourceCheckout not in _sys.meta_path:
    _sys.meta_path.insert(0, _SourceCheckout)
