"""The PythonAdapter's allowlist is a boundary, not a prefix (issue 19): no route through an
allowed module, a stored object, an argument or a result reaches another module.

The resolver is driven in-process on a real ``PythonAdapter`` (its tools are plain methods; the
context they read is the session id); a walk of the attribute graph of installed allowed
modules tries every route it finds into another module; one check goes through a real worker
process, as the README's example does."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import types
import warnings
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from numpy import typing as npt

import trio_bridge
from tests import allowlist_foreign
from tests.helpers import require
from trio_bridge import InvalidArgumentError, NotAllowedError, TrioBridgeError
from trio_bridge.adapters import PythonAdapter, StoredObjectNotFoundError

PYTHON = "trio_bridge.adapters:PythonAdapter"
TARGETS = "tests.allowlist_targets"


@dataclass
class Ctx:
    """What the adapter's tools read of their ``SessionContext``."""

    session_id: str = "s1"


def exists(path: str) -> bool:
    """Whether this release has the public ``path`` (importing its module): a route a release
    lacks (numpy.who from NumPy 2) is not part of its run."""
    module, _, name = path.rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return hasattr(importlib.import_module(module), name)
        except ImportError:
            return False


def adapter(*allow: str) -> PythonAdapter:
    instance = PythonAdapter()
    instance.options = {"allow": list(allow)}
    instance.setup()
    return instance


@pytest.fixture(autouse=True)
def _nothing_ran_yet():
    allowlist_foreign.RAN.clear()
    yield


def refused(instance: PythonAdapter, target: str, module: str, *args: Any, store_as: str | None = None, **kwargs: Any) -> str:
    """Call ``target``: it must be refused with a NotAllowedError naming ``module``."""
    with pytest.raises(NotAllowedError) as info:
        instance.call(Ctx(), target, list(args), kwargs, store_as)
    message = str(info.value)
    assert f"'{module}'" in message, message
    assert isinstance(info.value, InvalidArgumentError) and isinstance(info.value, TrioBridgeError)
    return message


# ---- the routes the issue lists --------------------------------------------------------------

@pytest.mark.parametrize(
    ("target", "args", "module"),
    [
        ("numpy.f2py.subprocess.check_output", [["id"]], "subprocess"),
        ("numpy.f2py.os.getcwd", [], "os"),
        ("numpy.ma.core.builtins.eval", ["1+1"], "builtins"),
        ("numpy.f2py.sys.exit", [], "sys"),
        ("numpy.f2py.crackfortran.fileinput.input", [], "fileinput"),
        ("numpy.ma.core.inspect.getsource", [], "inspect"),
        ("numpy.ctypeslib.ctypes.CDLL", [None], "ctypes"),
        # datetime imports sys on 3.11 only (from 3.12 it is its C module's)
        *([("datetime.sys.modules", [], "sys")] if hasattr(importlib.import_module("datetime"), "sys") else []),
        ("statistics.sys.modules", [], "sys"),
        ("statistics.sqrt", [4], "math"),  # math's function, re-exported
        # fractions imports decimal's Decimal up to 3.13 only
        *([("fractions.Decimal", [1], "decimal")] if hasattr(importlib.import_module("fractions"), "Decimal") else []),
        ("json.decoder.re.compile", ["x"], "re"),
        ("os.getcwd", [], "os"),
        ("numpyx.thing", [], "numpyx"),
    ],
)
def test_routes_out_of_allowed_modules_are_refused_naming_the_module(target, args, module):
    # numpy.f2py and numpy.ctypeslib named too: what they import stays outside
    instance = adapter("numpy", "numpy.f2py", "numpy.ctypeslib", "datetime", "statistics", "fractions", "json", "collections")
    message = refused(instance, target, module, *args)
    assert "adapter_options={'allow': [..., " in message or "'builtins' itself is allowed" in message


def test_the_readme_escape_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    message = refused(adapter("numpy"), "numpy.f2py.subprocess.check_output", "numpy.f2py", ["touch", str(marker)])
    assert "'numpy.f2py' runs or builds code" in message
    message = refused(adapter("numpy", "numpy.f2py"), "numpy.f2py.subprocess.check_output", "subprocess", ["touch", str(marker)])
    assert "numpy.f2py.subprocess is the module 'subprocess'" in message
    assert not marker.exists()


def test_builtins_are_refused_unless_builtins_itself_is_allowed():
    message = refused(adapter(TARGETS), f"{TARGETS}.evaluate", "builtins", "1+1")
    assert "eval, exec, open, getattr, __import__" in message
    assert adapter(TARGETS, "builtins").call(Ctx(), f"{TARGETS}.evaluate", ["1+1"]) == 2
    message = refused(adapter(TARGETS), f"{TARGETS}.getcwd", "posix")  # os's C module, named as found
    assert "from module 'posix' (part of 'os')" in message and "[..., 'os']" in message


# ---- what an attacker tries --------------------------------------------------------------------

def test_methods_of_plain_data_are_their_builtin_types():
    instance = adapter("numpy", TARGETS)
    ctx = Ctx()
    instance.call(ctx, f"{TARGETS}.give_numbers", store_as="data")
    refused(instance, "stored.data.append", "builtins", 1)
    refused(instance, "stored.data.copy", "builtins")
    refused(instance, "numpy.pi.hex", "builtins")  # a float's method
    refused(instance, "numpy.ndarray.mro", "builtins")  # type's method, through a class
    # through an alias to its class (from Python 3.12, numpy makes it a typing.TypeAliasType: typing's)
    refused(instance, "numpy.typing.NDArray.mro", "typing" if type(npt.NDArray).__module__ == "typing" else "builtins")
    assert instance.call(ctx, "numpy.pi.real") == np.pi  # data of data
    instance.call(ctx, "numpy.arange", [4], store_as="arr")
    assert instance.call(ctx, "stored.arr.sum") == 6  # ndarray.sum: numpy's
    assert instance.call(ctx, "stored.arr.T").tolist() == [0, 1, 2, 3]


def test_str_format_cannot_read_attributes_through_a_stored_string():
    """``"{0.__init__.__globals__}".format(x)`` would read any attribute: str.format is builtins'."""
    instance = adapter("numpy", TARGETS)
    ctx = Ctx()
    instance.call(ctx, "numpy.str_", ["{0.__class__}"], store_as="template")
    refused(instance, "stored.template.format", "builtins", 1)
    refused(instance, "stored.template.format_map", "builtins", {})


def test_results_outside_are_neither_returned_nor_stored():
    instance = adapter(TARGETS)
    ctx = Ctx()
    for function, module in [
        ("give_os", "os"),
        ("give_popen", "subprocess"),
        ("give_run", "tests.allowlist_foreign"),
        ("give_nested_eval", "builtins"),
        ("give_object_array", "tests.allowlist_foreign"),
        ("give_generator", "builtins"),  # a generator's gi_frame would lead anywhere
    ]:
        message = refused(instance, f"{TARGETS}.{function}", module)
        assert "the call ran, and its result was neither returned nor stored" in message
        refused(instance, f"{TARGETS}.{function}", module, store_as="kept")
    assert instance.list_stored(ctx) == {}
    assert allowlist_foreign.RAN == []


def test_a_ufunc_is_numpys_on_every_release():
    """NumPy's ufuncs say ``__module__ = 'numpy'`` from NumPy 2.2, nothing before: then their
    class, numpy.ufunc, places them, with the same verdict."""
    refused(adapter(TARGETS), f"{TARGETS}.give_ufunc", "numpy", store_as="sine")
    refused(adapter(TARGETS, "numpy.linalg"), f"{TARGETS}.give_ufunc", "numpy", store_as="sine")
    instance = adapter(TARGETS, "numpy")
    ctx = Ctx()
    assert instance.call(ctx, f"{TARGETS}.give_ufunc", store_as="sine") == {"stored": "sine", "type": "numpy.ufunc"}
    assert instance.call(ctx, "stored.sine", [0.0]) == 0.0
    assert instance.call(ctx, "numpy.add.reduce", [[1, 2, 3]]) == 6


def test_wrappers_are_judged_by_what_they_call():
    instance = adapter(TARGETS)
    ctx = Ctx()
    assert instance.call(ctx, f"{TARGETS}.partial_own", [2]) == 3
    assert instance.call(ctx, f"{TARGETS}.cached_own", [2, 3]) == 5
    assert instance.call(ctx, f"{TARGETS}.Model.plain", [2, 3]) == 5
    refused(instance, f"{TARGETS}.partial_foreign", "tests.allowlist_foreign")
    refused(instance, f"{TARGETS}.cached_foreign", "tests.allowlist_foreign")
    refused(instance, f"{TARGETS}.loud", "tests.allowlist_foreign")  # a foreign class's instance
    refused(instance, f"{TARGETS}.Model.shortcut", "tests.allowlist_foreign")  # a staticmethod
    with pytest.raises(NotAllowedError, match="which module defines it cannot be told"):
        instance.call(ctx, f"{TARGETS}.anonymous", [1, 2])  # __module__ None
    refused(instance, f"{TARGETS}.Liar", "os")  # a class is the module's its __module__ names
    assert allowlist_foreign.RAN == []


def test_reading_an_attribute_refuses_foreign_code_before_it_runs():
    instance = adapter(TARGETS)
    ctx = Ctx()
    refused(instance, f"{TARGETS}.spy", "tests.allowlist_foreign")  # met on the way
    refused(instance, f"{TARGETS}.spy.secret", "tests.allowlist_foreign")
    refused(instance, f"{TARGETS}.Model.reader", "tests.allowlist_foreign")  # __get__ on the class
    instance.call(ctx, f"{TARGETS}.Inheritor", store_as="heir")
    assert instance.call(ctx, "stored.heir.own") == "own"
    refused(instance, "stored.heir.secret", "tests.allowlist_foreign")  # a property of the base
    refused(instance, "stored.heir.missing", "tests.allowlist_foreign")  # the base's __getattr__
    refused(instance, "stored.heir.leak", "tests.allowlist_foreign")  # an inherited method
    instance.call(ctx, f"{TARGETS}.Model", store_as="model")
    refused(instance, "stored.model.reader", "tests.allowlist_foreign")
    assert allowlist_foreign.RAN == []


def test_stored_objects_and_stored_arguments_are_no_way_round():
    instance = adapter("numpy", "numpy.f2py", TARGETS)
    ctx = Ctx()
    # a stored module leads where the module leads, no further
    instance.call(ctx, "numpy.f2py", store_as="f2py")
    refused(instance, "stored.f2py.os.system", "os", "true")
    refused(instance, "stored.f2py.subprocess", "subprocess")
    # an allowed function slips a foreign one into a stored list: the list is then refused
    instance.call(ctx, f"{TARGETS}.give_numbers", store_as="items")
    assert instance.call(ctx, f"{TARGETS}.smuggle", [{"$stored": "items"}]) == 7
    message = refused(instance, "numpy.asarray", "tests.allowlist_foreign", {"$stored": "items"})
    assert "argument 0, stored object 'items', holds the function run" in message
    with pytest.raises(NotAllowedError):
        instance.retrieve(ctx, "items")
    refused(instance, "numpy.asarray", "tests.allowlist_foreign", a={"$stored": "items"})
    with pytest.raises(InvalidArgumentError, match="needs a str name"):
        instance.call(ctx, "numpy.asarray", [{"$stored": ["items"]}])
    with pytest.raises(StoredObjectNotFoundError):
        instance.call(ctx, "numpy.asarray", [{"$stored": "nope"}])
    assert allowlist_foreign.RAN == []  # smuggle only appended it: nothing called it


def test_a_pipeline_stops_at_the_first_refused_step():
    instance = adapter("numpy")
    ctx = Ctx()
    steps = [
        {"call": "numpy.arange", "args": [3], "store_as": "a"},
        {"call": "numpy.f2py.os.system", "args": ["true"]},
        {"call": "numpy.arange", "args": [4], "store_as": "b"},
    ]
    with pytest.raises(NotAllowedError, match=r"module 'numpy\.f2py'") as info:
        instance.pipeline(ctx, steps)
    assert "in pipeline step 1: numpy.f2py.os.system" in info.value.__notes__
    assert set(instance.list_stored(ctx)) == {"a"}


def test_private_and_dunder_names_stay_refused():
    instance = adapter("numpy", "builtins")
    for target in ("numpy.__loader__", "numpy._core", "numpy.ndarray.__subclasses__", "builtins.__import__"):
        with pytest.raises(InvalidArgumentError, match="public identifier"):
            instance.call(Ctx(), target)


def test_what_an_honest_user_does_keeps_working():
    instance = adapter("numpy", TARGETS)
    ctx = Ctx()
    assert instance.call(ctx, "numpy.linalg.norm", [[3, 4]]) == 5.0
    assert instance.call(ctx, "numpy.pi") == np.pi
    assert instance.call(ctx, "numpy.random.default_rng", [0], store_as="rng") == {
        "stored": "rng", "type": "numpy.random._generator.Generator"
    }
    assert instance.call(ctx, "stored.rng.normal", [], {"size": 3}).shape == (3,)
    data = [1.0, 2.0, 3.0]
    results = instance.pipeline(ctx, [
        {"call": f"{TARGETS}.Model", "kwargs": {"scale": 2.0}, "store_as": "model"},
        {"call": "stored.model.fit", "args": [data], "store_as": "model"},
        {"call": "stored.model.fitted"},
        {"call": "stored.model.predict", "args": [data]},
        {"call": "stored.model.score", "args": [data]},
        {"call": "stored.model", "args": [data]},  # a callable stored object
        {"call": "numpy.array", "args": [{"$stored": "model"}], "store_as": "boxed"},  # an allowed item
    ])
    assert results[2] is True and results[3].tolist() == [4.0] * 3 and results[5].tolist() == [4.0] * 3
    assert results[4] == pytest.approx(-(9 + 4 + 1) / 3)
    assert instance.list_stored(ctx) == {
        "boxed": "numpy.ndarray", "model": "tests.allowlist_targets.Model", "rng": "numpy.random._generator.Generator"
    }
    instance.call(ctx, f"{TARGETS}.give_numbers", store_as="mixed")
    assert instance.retrieve(ctx, "mixed")[:4] == [1, 2.5, "three", None]


def test_a_narrow_allowlist_refuses_what_classes_inherit_from_outside_it():
    require("sklearn")
    instance = adapter("numpy", "sklearn.linear_model")
    ctx = Ctx()
    instance.call(ctx, "sklearn.linear_model.LinearRegression", store_as="reg")
    x, y = [[0.0], [1.0], [2.0]], [1.0, 3.0, 5.0]
    instance.call(ctx, "stored.reg.fit", [x, y], store_as="reg")
    assert instance.call(ctx, "stored.reg.predict", [[[3.0]]]).tolist() == pytest.approx([7.0])
    message = refused(instance, "stored.reg.score", "sklearn.base", x, y)  # RegressorMixin's
    assert "open the pool with adapter_options={'allow': [..., 'sklearn.base']}" in message
    refused(instance, "sklearn.base.clone", "sklearn.base")


def test_with_numpy_linalg_only_arrays_are_data_and_their_methods_numpys(tmp_path):
    instance = adapter("numpy.linalg")
    ctx = Ctx()
    assert instance.call(ctx, "numpy.linalg.norm", [[3, 4]]) == 5.0
    instance.call(ctx, "numpy.linalg.inv", [np.eye(2) * 2], store_as="m")
    assert instance.call(ctx, "stored.m.shape") == (2, 2)
    assert instance.retrieve(ctx, "m").tolist() == [[0.5, 0.0], [0.0, 0.5]]
    refused(instance, "stored.m.tofile", "numpy", str(tmp_path / "m"))  # writes files: numpy's
    message = refused(instance, "numpy.load", "numpy", str(tmp_path / "m"), allow_pickle=True)
    assert message.startswith("'numpy.load' is in the module 'numpy', outside the allowed modules (numpy.linalg)")
    assert not (tmp_path / "m").exists()


def test_the_allow_option_must_be_module_names():
    for bad in ("numpy", ["numpy", ""], ["numpy.", "x"], [3], {"numpy": True}, ["numpy-x"]):
        instance = PythonAdapter()
        instance.options = {"allow": bad}
        with pytest.raises(ValueError, match="must be a list of module names"):
            instance.setup()


# ---- code that runs strings, getattr by another name, lazy iterators ----------------------------

def stored(name: str) -> dict[str, str]:
    return {"$stored": name}


@pytest.mark.parametrize(
    ("target", "args", "subtree"),
    [
        ("numpy.testing.measure", ["open({marker!r}, 'w')"], "numpy.testing"),  # exec of its argument
        ("numpy.testing.rundocs", ["{marker}"], "numpy.testing"),
        ("numpy.testing.extbuild.build_and_import_extension", ["m", []], "numpy.testing"),  # builds C
        ("numpy.f2py.compile", ["x"], "numpy.f2py"),
        *([("numpy.distutils.exec_command", ["touch {marker}"], "numpy.distutils")] if importlib.util.find_spec("numpy.distutils") else []),
        ("numpy.ctypeslib.load_library", ["libc", "/lib"], "numpy.ctypeslib"),
    ],
)
def test_code_running_subtrees_of_an_allowed_package_are_refused_unless_named(tmp_path, target, args, subtree):
    marker = str(tmp_path / "ran")
    message = refused(adapter("numpy"), target, subtree, *(a.format(marker=marker) if isinstance(a, str) else a for a in args))
    assert f"'{subtree}' runs or builds code" in message and f"[..., '{subtree}']" in message
    assert not (tmp_path / "ran").exists()


def test_a_code_running_subtree_is_judged_by_where_its_objects_belong(tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w')"
    # numpy.testing.measure says numpy.testing._private.utils: a re-export elsewhere is no way round
    refused(adapter("numpy", TARGETS), f"{TARGETS}.measure", "numpy.testing._private.utils", code)
    assert not marker.exists()
    # named explicitly, it is allowed (and runs what it is given)
    assert adapter("numpy", "numpy.testing").call(Ctx(), "numpy.testing.measure", ["x = 1"]) >= 0
    assert adapter("numpy.testing.overrides").call(Ctx(), "numpy.testing.overrides.allows_array_function_override", [np.sum])


def test_the_reviewers_operator_and_itertools_chain_is_refused():
    """The review's chain: attrgetter('__builtins__') and itemgetter('eval'), fed through
    itertools' lazy iterators past the checks, then operator.call(eval, code)."""
    s = stored
    steps = [
        ("operator", [], "op"), ("operator.attrgetter", ["call"], "ag"), ("stored.ag", [s("op")], "opcall"),
        ("operator.attrgetter", ["__builtins__"], "getb"), ("operator.itemgetter", ["eval"], "gete"),
        ("itertools.repeat", [s("op"), 1], "r"), ("itertools.zip_longest", [s("r")], "z1"),
        ("itertools.starmap", [s("getb"), s("z1")], "b"), ("itertools.zip_longest", [s("b")], "z2"),
        ("itertools.starmap", [s("gete"), s("z2")], "ev"),
        ("itertools.zip_longest", [s("ev"), ["__import__('subprocess').check_output(['id']).decode()"]], "z3"),
        ("itertools.starmap", [s("opcall"), s("z3")], "out"), ("operator.iadd", [[], s("out")], None),
    ]
    instance = adapter("operator", "itertools")
    ctx = Ctx()
    with pytest.raises(NotAllowedError, match=r"operator\.attrgetter, which reaches attributes or names by string") as info:
        instance.pipeline(ctx, [{"call": t, "args": a, "store_as": n} for t, a, n in steps])
    assert "in pipeline step 1: operator.attrgetter" in info.value.__notes__
    assert instance.list_stored(ctx) == {"op": "module"}
    # each hole on its own: the lazy iterators are refused too, with plain data in them
    for target, args in [("itertools.repeat", [s("op"), 1]), ("itertools.zip_longest", [[1], [2]]), ("itertools.count", [])]:
        with pytest.raises(NotAllowedError, match="an iterator: what it yields is made only when it is read") as info:
            instance.call(ctx, target, args, {}, "lazy")
        assert "its result was neither returned nor stored" in str(info.value)
    assert instance.list_stored(ctx) == {"op": "module"}


@pytest.mark.parametrize(
    ("allow", "target", "args", "module"),
    [
        (["operator"], "operator.attrgetter", ["__builtins__"], "builtins"),
        (["operator"], "operator.methodcaller", ["__reduce__"], "builtins"),
        (["inspect", "operator"], "inspect.getattr_static", [], "inspect"),
        (["pkgutil"], "pkgutil.resolve_name", ["os:system"], "pkgutil"),
        (["importlib"], "importlib.import_module", ["os"], "importlib"),
        (["string"], "string.Formatter", [], "builtins"),
        (["logging"], "logging.Formatter", ["{x.__class__}"], "builtins"),
        (["typing"], "typing.get_type_hints", [1], "builtins"),
        (["typing"], "typing.ForwardRef", ["x"], "builtins"),
        (["timeit"], "timeit.timeit", ["1"], "timeit"),
        (["code"], "code.InteractiveInterpreter", [], "code"),
        (["runpy"], "runpy.run_module", ["this"], "runpy"),
        (["pdb"], "pdb.run", ["1"], "pdb"),
        (["pickle"], "pickle.loads", [b"N."], "pickle"),
        (["marshal"], "marshal.loads", [b"N"], "marshal"),
        (["types"], "types.FunctionType", [], "builtins"),
        (["types"], "types.CodeType", [], "builtins"),
        (["ctypes"], "ctypes.CDLL", [None], "ctypes"),
        (["logging"], "logging.config.dictConfig", [{"version": 1}], "logging.config"),
        (["unittest"], "unittest.mock.patch", ["os.system"], "unittest.mock"),
        (["xmlrpc"], "xmlrpc.server.resolve_dotted_attribute", [], "xmlrpc.server"),
        (["numpy"], "numpy.info", ["x"], "builtins"),  # info(toplevel=) imports by name
        (["numpy"], "numpy.bmat", ["self"], "builtins"),  # reads names from its caller's frame
        (["numpy"], "numpy.r_", [], "builtins"),  # r_["self"] is bmat's
        (["numpy"], "numpy.lib.add_newdoc", ["os", "system", "x"], "builtins"),
        (["numpy"], "numpy.test", [], "builtins"),  # numpy.test(tests=[path]) runs a file
        (["numpy"], "numpy.c_", [], "builtins"),
        (["numpy"], "numpy.matlib.bmat", ["self"], "builtins"),
        # NumPy 1.x only: imports modules by name, reads the caller's frame, runs a file as a module
        *[(["numpy"], target, args, "builtins") for target, args in [
            ("numpy.add_newdoc", ["os", "system", "x"]),
            ("numpy.lookfor", ["os"]),
            ("numpy.who", []),
            ("numpy.lib.utils.info", ["x"]),
            ("numpy.core.function_base.add_newdoc", ["os", "system", "x"]),
            ("numpy.compat.npy_load_module", ["m", "/dev/null"]),
            ("numpy.lib.index_tricks.AxisConcatenator", []),
        ] if exists(target)],
        (["webbrowser"], "webbrowser.get", ["sh -c id %s"], "webbrowser"),  # runs a command line
        (["multiprocessing"], "multiprocessing.connection.Client", [], "multiprocessing"),  # unpickles
    ],
)
def test_callables_that_reach_attributes_or_names_by_string_are_refused(allow, target, args, module):
    with warnings.catch_warnings():  # NumPy 2 keeps numpy.core.* as an alias that warns when read
        warnings.filterwarnings("ignore", "numpy.core", DeprecationWarning)
        message = refused(adapter(*allow), target, module, *args)
    assert "'builtins' itself is allowed" in message or f"[..., '{module}']" in message
    assert allowlist_foreign.RAN == []


def test_what_reaches_by_string_is_refused_as_a_result_too_and_allowed_with_builtins():
    ctx = Ctx()
    message = refused(adapter(TARGETS, "operator"), f"{TARGETS}.give_attrgetter", "builtins", store_as="g")
    assert "a operator.attrgetter object, which reaches attributes or names by string" in message
    everything = adapter("operator", "builtins")
    everything.call(ctx, "operator", store_as="op")
    everything.call(ctx, "operator.attrgetter", ["__name__"], store_as="name")
    assert everything.call(ctx, "stored.name", [stored("op")]) == "operator"


def test_objects_whose_contents_cannot_be_checked_are_refused():
    instance = adapter(TARGETS, "itertools", "collections", "numpy")
    ctx = Ctx()
    with pytest.raises(NotAllowedError, match="an iterator"):
        instance.call(ctx, f"{TARGETS}.give_repeat", [], {}, "lazy")
    for function in ("give_deque", "give_defaultdict"):  # what they hold is checked
        message = refused(instance, f"{TARGETS}.{function}", "tests.allowlist_foreign", store_as="kept")
        assert "holds the function run" in message
    instance.call(ctx, f"{TARGETS}.give_holder", store_as="holder")  # an instance's attributes: when read
    refused(instance, "stored.holder.hook", "tests.allowlist_foreign")
    assert instance.call(ctx, f"{TARGETS}.give_slice", [False], store_as="cut") == {"stored": "cut", "type": "slice"}
    refused(instance, f"{TARGETS}.give_slice", "tests.allowlist_foreign", True, store_as="bad")
    instance.call(ctx, "numpy.arange", [3], store_as="a")
    with pytest.raises(NotAllowedError, match=r"numpy\.flatiter object, an iterator"):
        instance.call(ctx, "stored.a.flat", [], {}, "flat")
    with pytest.raises(NotAllowedError, match=r"numpy\.nditer object, an iterator"):
        instance.call(ctx, "numpy.nditer", [[1, 2]], {}, "it")
    assert set(instance.list_stored(ctx)) == {"a", "holder", "cut"}
    assert instance.call(ctx, "collections.deque", [[1, 2]], store_as="d") == {"stored": "d", "type": "collections.deque"}
    assert allowlist_foreign.RAN == []


@pytest.mark.parametrize(
    ("allow", "steps", "module"),
    [
        # a foreign callable cannot be stored, so numpy's and functools' higher-order functions never get one
        (["numpy", TARGETS], [(f"{TARGETS}.loud", [], "f"), ("numpy.frompyfunc", [stored("f"), 1, 1], "u")], "tests.allowlist_foreign"),
        (["numpy", TARGETS], [(f"{TARGETS}.give_run", [], "f"), ("numpy.vectorize", [stored("f")], "v")], "tests.allowlist_foreign"),
        (["numpy", TARGETS], [(f"{TARGETS}.evaluate", [], "f"), ("numpy.apply_along_axis", [stored("f"), 0, [["1"]]], None)], "builtins"),
        (["functools", "operator"], [("operator", [], "op"), ("operator.attrgetter", ["__builtins__"], "g"),
                                     ("functools.reduce", [stored("g"), [stored("op")]], None)], "builtins"),
        (["functools", "operator", TARGETS], [(f"{TARGETS}.evaluate", [], "e"),
                                               ("functools.reduce", [stored("e"), ["1", "2"]], None)], "builtins"),
        (["numpy", TARGETS], [(f"{TARGETS}.give_numbers", [], "items"), (f"{TARGETS}.smuggle", [stored("items")], None),
                              ("numpy.frompyfunc", [stored("items"), 1, 1], "u")], "tests.allowlist_foreign"),
        (["numpy"], [("builtins.map", [], None)], "builtins"),
        (["numpy"], [("builtins.filter", [], None)], "builtins"),
        (["inspect", "operator"], [("operator", [], "op"), ("inspect.getattr_static", [stored("op"), "__builtins__"], None)], "inspect"),
        (["string", "numpy"], [("string.Formatter", [], "f"), ("stored.f.get_field", ["0.__class__", [1], {}], None)], "builtins"),
        (["pkgutil"], [("pkgutil.resolve_name", ["builtins:eval"], "e")], "pkgutil"),
    ],
)
def test_variants_of_the_review_are_refused(allow, steps, module):
    instance = adapter(*allow)
    with pytest.raises(NotAllowedError) as info:
        instance.pipeline(Ctx(), [{"call": t, "args": a, "store_as": n} for t, a, n in steps])
    assert f"'{module}'" in str(info.value), str(info.value)
    assert allowlist_foreign.RAN == []


def test_honest_sklearn_objects_are_checked_inside_and_keep_working():
    require("sklearn")
    instance = adapter("numpy", "sklearn")
    ctx = Ctx()
    x, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    instance.pipeline(ctx, [
        {"call": "sklearn.preprocessing.StandardScaler", "store_as": "scaler"},
        {"call": "sklearn.linear_model.LogisticRegression", "store_as": "clf"},
        {"call": "sklearn.pipeline.make_pipeline", "args": [stored("scaler"), stored("clf")], "store_as": "pipe"},
        {"call": "sklearn.model_selection.GridSearchCV", "args": [stored("pipe"), {"logisticregression__C": [0.1, 1.0]}],
         "kwargs": {"cv": 2}, "store_as": "search"},
        {"call": "stored.search.fit", "args": [x, y], "store_as": "search"},
        # a fitted ColumnTransformer holds slices
        {"call": "sklearn.compose.make_column_transformer", "args": [["passthrough", [0]]],
         "kwargs": {"remainder": "drop"}, "store_as": "columns"},
        {"call": "stored.columns.fit", "args": [x], "store_as": "columns"},
    ])
    assert instance.call(ctx, "stored.search.predict", [x]).shape == (20,)
    assert 0.0 <= instance.call(ctx, "stored.search.score", [x, y]) <= 1.0


# ---- the walk of the attribute graph ---------------------------------------------------------

ROOTS = ["numpy", "math", "statistics", "datetime", "json", "collections", "fractions", "decimal"]
DATA_TYPES = {type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset, range}
DATA = "data"


def home(obj: Any) -> str | None:
    """The oracle, written apart from the resolver with ``inspect``: the module whose code
    ``obj`` is (DATA for plain data, None when it cannot tell)."""
    kind = type(obj)
    if kind in DATA_TYPES or kind is np.ndarray or (isinstance(obj, np.generic) and kind.__module__ == "numpy"):
        return DATA
    if by_string(obj):
        return "builtins"
    if inspect.ismodule(obj):
        return obj.__name__
    if inspect.isclass(obj):
        return obj.__module__
    if isinstance(obj, types.GenericAlias):
        return home(obj.__origin__)
    if isinstance(obj, property):
        return home(obj.fget)
    if isinstance(obj, functools.partial):
        return home(obj.func)
    if inspect.ismethod(obj):
        return home(obj.__func__)
    if inspect.isbuiltin(obj):
        owner = obj.__self__
        if owner is None or inspect.ismodule(owner):
            return owner.__name__ if owner is not None else obj.__module__
        holder = owner if inspect.isclass(owner) else type(owner)
        raw = inspect.getattr_static(holder, obj.__name__)
        return getattr(raw, "__objclass__", holder).__module__
    if hasattr(obj, "__objclass__"):
        return obj.__objclass__.__module__
    if callable(obj):
        module = getattr(obj, "__module__", None)
        if module is None and not inspect.isfunction(obj) and type(inspect.getattr_static(kind, "__call__")).__module__ == "builtins":
            return kind.__module__  # a C callable that says nothing of itself (ufuncs before NumPy 2.2): its class's
        return module
    return kind.__module__


MISSING = object()


def reading_home(obj: Any, name: str) -> str | None:
    """The oracle for the code ``getattr(obj, name)`` runs on the way: a property's getter, a
    Python descriptor's ``__get__``, a ``__getattr__`` (DATA: none of those)."""
    raw = inspect.getattr_static(obj, name, MISSING)
    if raw is MISSING:
        hook = inspect.getattr_static(type(obj), "__getattr__", None)
        return DATA if hook is None or inspect.ismodule(obj) else home(hook)
    if isinstance(raw, property):
        return DATA if raw.fget is None or inspect.isclass(obj) else home(raw.fget)
    if isinstance(raw, functools.cached_property):
        return home(raw.func)
    if type(raw).__module__ in ("enum", "types"):  # the language's descriptors: what they wrap
        wrapped = home(raw.fget) if getattr(raw, "fget", None) else DATA
        return DATA if wrapped in ("enum", "types") else wrapped
    if (
        not hasattr(type(raw), "__get__") or type(raw).__module__ == "builtins"
        or (callable(raw) and isinstance(getattr(raw, "__module__", None), str))  # binds a function
    ):
        return DATA
    return type(raw).__module__


GUARDED = ["numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib"]  # run or build code
RUN_CODE = {"builtins", "importlib", "inspect", "pickle", "pkgutil", "runpy", "code", "timeit", "ctypes", "marshal"}


def by_string(obj: Any) -> bool:
    """NumPy's objects that reach names by string: ``info(toplevel=)`` imports it, ``bmat`` and
    ``r_["a, b"]`` read names from their caller's frame, ``add_newdoc`` imports and rewrites,
    ``test(tests=[path])`` runs a file; before NumPy 2 also ``lookfor`` (imports), ``who`` (reads
    the caller's frame) and ``compat.npy_load_module`` (runs a file). Found by their public names."""
    return any(obj is f for f in BY_STRING_FUNCTIONS) or isinstance(obj, BY_STRING_CLASSES) or (
        inspect.isclass(obj) and issubclass(obj, BY_STRING_CLASSES)
    )


BY_STRING_CLASSES = tuple(k for k in (*type(np.r_).__mro__, type(np.test)) if k is not object)  # r_'s AxisConcatenator
BY_STRING_FUNCTIONS = [
    np.info, np.bmat, np.lib.add_newdoc,
    *(getattr(np, name) for name in ("lookfor", "who") if exists(f"numpy.{name}")),
    *([importlib.import_module("numpy.compat").npy_load_module] if exists("numpy.compat.npy_load_module") else []),
]


def inside(module: str, roots: list[str]) -> bool:
    top, dot, rest = module.partition(".")
    name = {"posix": "os", "posixpath": "os.path"}.get(top, top.lstrip("_")) + dot + rest
    if name.partition(".")[0] in RUN_CODE:
        return "builtins" in roots
    guard = next((g for g in GUARDED if name == g or name.startswith(g + ".")), None)
    return any(
        (name == root or name.startswith(root + ".")) and (guard is None or root == guard or root.startswith(guard + "."))
        for root in roots
    )


def routes(start: list[tuple[str, Any]], roots: list[str], depth: int) -> list[tuple[str, bool | None]]:
    """Every public attribute route from ``start`` up to ``depth`` names deep (beyond two names,
    only through modules and classes), each with whether it leads outside ``roots`` (None: the
    oracle cannot tell). A route is not followed past the first object outside."""
    found: list[tuple[str, bool | None]] = []
    expanded: set[int] = set()
    frontier = start
    for level in range(depth):
        following = []
        for path, obj in frontier:
            if id(obj) in expanded or (level > 1 and not (inspect.ismodule(obj) or inspect.isclass(obj))):
                continue
            expanded.add(id(obj))
            try:
                names = sorted(name for name in dir(obj) if not name.startswith("_"))
            except Exception:
                continue
            for name in names:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        child = getattr(obj, name)
                    except Exception:
                        continue
                wheres = [reading_home(obj, name), home(child)]
                outside = None if None in wheres else any(w != DATA and not inside(w, roots) for w in wheres)
                found.append((f"{path}.{name}", outside))
                if outside is False:
                    following.append((f"{path}.{name}", child))
        frontier = following
    return found


def mismatches(instance: PythonAdapter, found: list[tuple[str, bool | None]], store: dict[str, Any]) -> list[str]:
    wrong = []
    for path, outside in found:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                instance._resolve(path, store)
            got: bool | str = False
        except NotAllowedError:
            got = True
        except Exception as exc:  # anything but a refusal or a resolution is a bug
            got = f"{type(exc).__name__}: {exc}"
        if got is not (outside is not False):  # an unknown origin must be refused too
            wrong.append(f"{path}: the oracle says {'outside' if outside else 'unknown' if outside is None else 'inside'}, the resolver {'refused' if got is True else 'resolved' if got is False else got}")
    return wrong


def test_every_route_out_of_the_allowed_modules_graph_is_refused_and_every_route_inside_resolves():
    instance = adapter(*ROOTS)
    start = [(root, importlib.import_module(root)) for root in ROOTS]
    found = routes(start, ROOTS, depth=3)
    escapes = [path for path, outside in found if outside]
    assert len(found) > 5000 and len(escapes) > 500, (len(found), len(escapes))  # the walk found the doors
    doors = {"numpy.f2py", "numpy.testing", "numpy.ctypeslib", "numpy.bmat", "numpy.r_", "statistics.sys"} | ({"datetime.sys"} if hasattr(importlib.import_module("datetime"), "sys") else set())
    assert doors <= set(escapes)
    assert mismatches(instance, found, {}) == []


def test_every_route_out_of_stored_objects_is_refused():
    instance = adapter(*ROOTS, TARGETS)
    ctx = Ctx()
    store: dict[str, Any] = {
        "arr": np.arange(3.0), "objects": np.array([1, "a"], dtype=object), "scalar": np.float64(2.5),
        "text": "{0}", "items": [1, 2], "mapping": {"a": 1}, "fraction": Fraction(1, 3), "decimal": Decimal("1.5"),
        "when": datetime(2026, 1, 1), "span": timedelta(seconds=3), "queue": deque([1]), "counts": Counter("aab"),
        "ordered": OrderedDict(a=1), "rng": np.random.default_rng(0), "dtype": np.dtype("f8"),
    }
    for name, value in store.items():
        instance._store(ctx)[name] = value
    found = routes([(f"stored.{name}", value) for name, value in store.items()], ROOTS, depth=2)
    assert {"stored.text.format", "stored.items.append", "stored.mapping.keys"} <= {p for p, o in found if o}
    assert mismatches(instance, found, instance._store(ctx)) == []


ATTACK_NAMES = ["os", "sys", "subprocess", "builtins", "eval", "system", "format", "mro", "f2py", "modules", "real"]


def replay(path: str, store: dict[str, Any]) -> bool | None:
    """The oracle on a path: does every step stay inside (None: it cannot tell)?"""
    parts = path.split(".")
    if parts[0] == "stored":
        obj, parts = store[parts[1]], parts[2:]
    else:
        obj, parts = importlib.import_module(parts[0]), parts[1:]
    wheres = [home(obj)]
    for name in parts:
        wheres.append(reading_home(obj, name))
        obj = getattr(obj, name)
        wheres.append(home(obj))
    return None if None in wheres else all(w == DATA or inside(w, ROOTS) for w in wheres)


def test_random_deep_paths_agree_with_the_oracle():
    """Random walks of up to six names down the attribute graph (of modules, classes, data and
    stored objects, past the exhaustive walk's depth), with the names an attacker tries: what
    the oracle finds inside at every step resolves, anything else is refused."""
    hypothesis = require("hypothesis")
    st = hypothesis.strategies
    instance = adapter(*ROOTS)
    store = {
        "arr": np.arange(3.0), "text": "{0}", "items": [1, 2], "when": datetime(2026, 1, 1),
        "number": Fraction(1, 3), "rng": np.random.default_rng(0),
    }
    instance._store(Ctx()).update(store)
    heads = [*ROOTS, *(f"stored.{name}" for name in store)]

    @hypothesis.settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @hypothesis.given(st.data())
    def check(data: Any) -> None:
        path = data.draw(st.sampled_from(heads))
        obj = store[path[7:]] if path.startswith("stored.") else importlib.import_module(path)
        for _ in range(data.draw(st.integers(1, 6))):
            names = sorted({name for name in dir(obj) if not name.startswith("_")} | set(ATTACK_NAMES))
            name = data.draw(st.sampled_from(names))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    obj = getattr(obj, name)
                except Exception:
                    break
            path = f"{path}.{name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = replay(path, store)
            try:
                instance._resolve(path, store)
                got = "resolved"
            except NotAllowedError:
                got = "refused"
        assert got == ("resolved" if expected else "refused"), f"{path}: the oracle says {expected}"

    check()


# ---- through a real worker process --------------------------------------------------------------

@pytest.mark.real_process
async def test_the_readme_escape_is_refused_by_a_real_worker(tmp_path):
    marker = tmp_path / "ran"
    async with trio_bridge.open_pool(PYTHON, size=1, adapter_options={"allow": ["numpy"]}) as pool:
        with pytest.raises(NotAllowedError, match=r"module 'numpy\.f2py'") as info:
            await pool.call("numpy.f2py.subprocess.check_output", ["id"])
        assert "adapter_options={'allow': [..., 'numpy.f2py']}" in str(info.value)
        with pytest.raises(NotAllowedError, match=r"module 'numpy\.testing'"):
            await pool.call("numpy.testing.measure", "import os; os.system('touch ' + repr(str(marker)))")
        with pytest.raises(NotAllowedError, match=r"module 'numpy\.f2py'"):
            await pool.call("numpy.f2py.subprocess.check_output", ["touch", str(marker)])
        with pytest.raises(NotAllowedError, match="module 'builtins'"):
            await pool.call("numpy.ma.core.builtins.eval", "1+1")
        assert await pool.call("numpy.linalg.norm", [3, 4]) == 5.0
    assert not marker.exists()
