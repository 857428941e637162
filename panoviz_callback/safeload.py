"""Read a checkpoint as data: a restricted unpickler that never imports or calls what the file names.

``torch.load(weights_only=True)`` refuses any object it does not know; full unpickling
(``weights_only=False``) runs whatever the file asks for. :func:`safe_torch_load` sits
between the two: tensors, plain containers and the types torch's own weights-only loader
allows are rebuilt as usual, and every other global the file names becomes an
:class:`InertObject`, an empty record of the saved state (constructor arguments, ``__setstate__``
state, dict items, list items). No module named in the file is imported and nothing it
names is called.

:func:`to_plain` turns records into plain data (a pydantic model or dataclass becomes the
dict of its fields, ``argparse.Namespace`` a dict, a path its string, an enum its value);
:func:`find_calls` lists the records that stand for a *function call* in the file
(``os.system(...)``, ``builtins.eval(...)``): their values cannot be known without running
code, so the reader refuses such a checkpoint unless the user trusts it.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import posixpath
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["InertObject", "InertCall", "safe_torch_load", "to_plain", "find_calls", "inert_records", "describe"]

#: Modules whose globals are functions with effects; a record of one is always a call.
_CODE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib", "runpy", "pty",
    "socket", "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "operator", "functools", "types",
    "webbrowser", "multiprocessing", "threading", "asyncio", "signal", "io", "_io", "tempfile",
})
_PATH_CLASSES = frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path", "PurePath"})
_MAX_DEPTH = 64


class InertObject:
    """A record of an object the file described, of a class that is never imported.

    Attributes:
        args: the constructor / ``__new__`` arguments (tuple).
        state: what ``__setstate__`` received (None if nothing).
        items: dict items set on it (a dict subclass).
        listitems: list items appended to it (a list subclass).
    """

    _global = "?"
    _called = False

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, listitems=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments were recorded by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["listitems"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["listitems"].extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> InertCall:
        return InertCall(self, args)

    def __getattr__(self, name: str) -> Any:  # pickle probes e.g. __setstate__ / append on the instance
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"

    @property
    def global_name(self) -> str:
        """``module.Name`` as written in the file."""
        return type(self)._global

    @property
    def is_call(self) -> bool:
        """True when the record stands for calling a function, not rebuilding a data object."""
        return type(self)._called


class InertCall(InertObject):
    """A call of an inert record (``f(...)`` where ``f`` came from the file)."""

    def __new__(cls, func: Any = None, args: tuple = ()) -> InertCall:  # type: ignore[override]
        obj = InertObject.__new__(cls, *args)
        obj.__dict__["func"] = func
        return obj

    @property
    def global_name(self) -> str:
        func = self.__dict__.get("func")
        return f"{getattr(func, 'global_name', '?')}(...)"

    @property
    def is_call(self) -> bool:
        return True


_CLASSES: dict[tuple[str, str], type] = {}


def _inert_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _CLASSES:
        head = name.split(".")[-1]
        called = module.split(".")[0] in _CODE_MODULES or module in _CODE_MODULES or not head[:1].isupper()
        safe_name = "".join(c if c.isalnum() or c == "_" else "_" for c in head) or "Inert"
        _CLASSES[key] = type(safe_name, (InertObject,), {"_global": f"{module}.{name}", "_called": called,
                                                          "__module__": __name__})
    return _CLASSES[key]


def _allowed_globals() -> dict[str, Any]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - a torch without the private helper: the basic set below
        allowed = {}
    allowed.update({
        "collections.OrderedDict": __import__("collections").OrderedDict,
        "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
        "builtins.bytearray": bytearray, "builtins.slice": slice, "builtins.range": range,
        "torch.Size": torch.Size, "torch.device": torch.device,
    })
    allowed.update({f"torch.{name}": getattr(torch, name) for name in dir(torch)
                    if isinstance(getattr(torch, name, None), torch.dtype)})
    allowed.update(_numpy_globals())
    return allowed


def _numpy_globals() -> dict[str, Any]:
    """NumPy's array and scalar rebuilders (data only: an object array's items go through this unpickler)."""
    try:
        import numpy as np
    except ImportError:
        return {}
    import importlib

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # NumPy 2
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = multiarray._reconstruct
        out[f"{mod}.scalar"] = multiarray.scalar
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else ():
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            out[f"numpy.dtypes.{name}"] = obj
    return out


_ALLOWED: dict[str, Any] | None = None


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` for inert classes only (protocol 0/1 objects)."""
    if isinstance(cls, type) and issubclass(cls, InertObject):
        return cls.__new__(cls)
    raise pickle.UnpicklingError(f"refusing to rebuild {cls!r} with copyreg")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        if module in _compat_pickle.IMPORT_MAPPING or (module, name) in _compat_pickle.NAME_MAPPING:
            # protocol 2 writes Python 2 names (__builtin__.set); no Python 3 module has those names
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if full == "copyreg._reconstructor":
            return _reconstructor
        return _inert_class(module, name)


def _load(file: Any, **kwargs: Any) -> Any:
    return _Unpickler(file, **kwargs).load()


#: A module object usable as torch.load's ``pickle_module``: only ``Unpickler``/``load`` differ from pickle.
_pickle_module = types.ModuleType("panoviz_safe_pickle")
_pickle_module.__dict__.update(Unpickler=_Unpickler, load=_load,
                               UnpicklingError=pickle.UnpicklingError, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)


def safe_torch_load(path: Any, *, mmap: bool = False) -> Any:
    """``torch.load`` onto the CPU with the inert unpickler (nothing in the file is imported or called).

    Raises:
        Whatever ``torch.load`` raises for a damaged file (``pickle.UnpicklingError``, ``RuntimeError``, ...).
    """
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module, mmap=mmap)


# ------------------------------------------------------------------------------------------- reading records
def inert_records(obj: Any, where: str = "") -> Iterator[tuple[str, InertObject]]:
    """Every :class:`InertObject` inside ``obj`` with its location (``hyper_parameters.config``), depth-first."""
    stack: list[tuple[str, Any, int]] = [(where, obj, 0)]
    seen: set[int] = set()
    while stack:
        loc, node, depth = stack.pop()
        if id(node) in seen or depth > _MAX_DEPTH or isinstance(node, torch.Tensor | str | bytes | int | float):
            continue
        seen.add(id(node))
        children: list[tuple[str, Any]] = []
        if isinstance(node, InertObject):
            yield loc, node
            d = node.__dict__
            children = [(f"{loc}(args)", d["args"]), (f"{loc}(state)", d["state"]), (f"{loc}", d["items"]),
                        (f"{loc}", d["listitems"])]
            if "func" in d:
                children.append((loc, d["func"]))
        elif isinstance(node, Mapping):
            children = [(f"{loc}.{k}" if loc else str(k), v) for k, v in node.items()]
        elif isinstance(node, list | tuple | set | frozenset):
            children = [(f"{loc}[{i}]", v) for i, v in enumerate(node)]
        stack.extend((child_loc, child, depth + 1) for child_loc, child in reversed(children))


def find_calls(obj: Any) -> list[tuple[str, str]]:
    """``[(location, "module.function"), ...]`` for every record that stands for a function call."""
    return [(loc, rec.global_name) for loc, rec in inert_records(obj) if rec.is_call]


def describe(record: InertObject) -> str:
    """``"a call to os.system"`` / ``"an object of class cora.config.CORAConfig"``."""
    if record.is_call:
        return f"a call to {record.global_name.removesuffix('(...)')}"
    return f"an object of class {record.global_name}"


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """Records -> plain data, recursively: dicts, lists, tuples and scalars; tensors are kept.

    A record with a ``__dict__``-style state (pydantic models, dataclasses, ``argparse.Namespace``)
    becomes the dict of its fields (pydantic's ``__pydantic_extra__`` merged in), a dict subclass
    its items, a list subclass its items, a path its string, a one-argument value (enum) the
    argument; anything else a dict ``{"__class__": name, "args": [...]}``.
    """
    if _depth > _MAX_DEPTH:
        return None
    nxt = _depth + 1
    if isinstance(obj, InertObject):
        d = obj.__dict__
        name = obj.global_name.rsplit(".", 1)[-1]
        state = d["state"]
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], Mapping)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) state
        if isinstance(state, Mapping):
            fields = state.get("__dict__") if isinstance(state.get("__dict__"), Mapping) else state
            out = {str(k): to_plain(v, nxt) for k, v in fields.items() if not str(k).startswith("__pydantic")}
            extra = state.get("__pydantic_extra__")
            if isinstance(extra, Mapping):
                out.update({str(k): to_plain(v, nxt) for k, v in extra.items()})
            out.update({str(k): to_plain(v, nxt) for k, v in d["items"].items()})
            return out
        if d["items"]:
            return {to_plain(k, nxt): to_plain(v, nxt) for k, v in d["items"].items()}
        if d["listitems"]:
            return [to_plain(v, nxt) for v in d["listitems"]]
        args = d["args"]
        if name in _PATH_CLASSES and all(isinstance(a, str) for a in args):
            return posixpath.join(*args) if args else "."
        if len(args) == 1 and isinstance(args[0], str | int | float | bool) and state is None:
            return args[0]
        return {"__class__": obj.global_name, "args": [to_plain(a, nxt) for a in args]}
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str | int | float | bool) else str(k): to_plain(v, nxt) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v, nxt) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, nxt) for v in obj)
    if isinstance(obj, set | frozenset):
        return sorted((to_plain(v, nxt) for v in obj), key=repr)
    item = getattr(obj, "item", None)
    if type(obj).__module__ == "numpy" and callable(item):  # NumPy scalars and small arrays -> Python values
        return item() if getattr(obj, "ndim", 0) == 0 else (obj.tolist() if obj.size <= 4096 else obj)
    return obj
