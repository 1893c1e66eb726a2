"""The tree stays easy to walk: no import circles, no module reaching into another's private
names, and the worker side stays import-light."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "trio_bridge"

# Deliberate, documented reaches into third-party internals: (file, expression).
ALLOWED_PRIVATE = {
    # betterproto2 keeps a message's unknown fields only there; bytes(message) appends them
    ("_wire/fast_proto.py", "message._unknown_fields"),
    ("_wire/limits.py", "message._unknown_fields"),  # checked to be well-formed protobuf
    ("_wire/call_messages.py", "request._unknown_fields"),  # a request with any is left to fast_proto
    ("_wire/call_messages.py", "arguments._unknown_fields"),
    ("_wire/call_messages.py", "result._unknown_fields"),  # an answer with any is left to fast_proto
    ("_wire/call_messages.py", "response._unknown_fields"),
    ("_wire/call_messages.py", "payload._unknown_fields"),
    # betterproto2's field metadata of a message class: the fast codec and the limits read it
    ("_wire/fast_proto.py", "cls._betterproto"),
    ("_wire/limits.py", "cls._betterproto"),
}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "generated" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _runtime_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """trio_bridge modules imported when ``name`` is imported (not under ``if TYPE_CHECKING``)."""
    imported: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return  # imported lazily, when called
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trio_bridge"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                imported.add(full if full in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in tree.body:
        visit(statement)
    imported.discard(name)
    return imported


def test_no_import_circles():
    modules = _modules()
    graph = {name: _runtime_imports(name, tree, set(modules)) for name, tree in modules.items()}
    # A package imports its parent packages implicitly; ignore edges to ancestors.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def _is_module(dotted: str) -> bool:
    """Importing a private module of the package is fine; importing a module's private name is not."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _private_names_defined(tree: ast.Module) -> set[str]:
    """Private attribute names a module's own classes define (``self._x = ...``, ``def _x``, ``_x: T``,
    ``_x = ...`` in a class body)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_")
            and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)  # (a write to another object's private name is a reach, not a definition)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.startswith("_"):
            names.add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name) and t.id.startswith("_"))
    return names


def _classes_extending_third_party(tree: ast.Module) -> set[str]:
    """Classes of a module with a base from outside trio_bridge (directly, or through a class of
    the module): their ``self._x`` may be the third-party base's protected members (grpclib's
    ``Channel``, h2's ``H2Connection``, asyncio's protocols), extended on purpose."""
    imported_from_us = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trio_bridge"):
            imported_from_us.update(a.asname or a.name for a in node.names)
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    extending: set[str] = set()

    def third_party(base: ast.expr, seen: frozenset[str]) -> bool:
        root = base
        while isinstance(root, ast.Attribute):
            root = root.value
        if not isinstance(root, ast.Name) or root.id in ("object", "Protocol", "Generic", "Exception"):
            return False
        if root.id in classes and isinstance(base, ast.Name):
            return root.id not in seen and any(third_party(b, seen | {root.id}) for b in classes[root.id].bases)
        return root.id not in imported_from_us  # imported from another package (or a module: pb.X is ours)

    for name, node in classes.items():
        if any(third_party(b, frozenset({name})) for b in node.bases):
            extending.add(name)
    return extending


def _enclosing_classes(tree: ast.Module) -> dict[ast.AST, str]:
    """Each node of a class body (methods included) -> the name of its innermost class."""
    inside: dict[ast.AST, str] = {}

    def visit(node: ast.AST, cls: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.ClassDef) else cls
            if name is not None:
                inside[child] = name
            visit(child, name)

    visit(tree, None)
    return inside


def test_no_module_reaches_into_another_modules_private_names():
    """``x._name`` -- ``self._name`` too -- only for names its own module defines: a private
    name of another module's class (a base class of ours included) is that module's business.
    The exceptions: ``_create`` (NoPublicConstructor), ``os``/``sys``, the documented
    third-party reaches of ``ALLOWED_PRIVATE``, and ``self``/``cls`` in a class that extends a
    third-party class (its protected members)."""
    offences = []
    for path in PACKAGE.rglob("*.py"):
        if "generated" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        own = _private_names_defined(tree)
        extending = _classes_extending_third_party(tree)
        enclosing = _enclosing_classes(tree)
        relative = str(path.relative_to(PACKAGE))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trio_bridge"):
                offences += [
                    f"{relative}:{node.lineno}: imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__") and not _is_module(f"{node.module}.{a.name}")
                ]
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            expression = ast.unparse(node)
            if node.attr == "_create" or node.attr in own or (relative, expression) in ALLOWED_PRIVATE:
                continue  # NoPublicConstructor's way in; this module's own classes; documented reaches
            if isinstance(node.value, ast.Name) and node.value.id in ("os", "sys"):
                continue  # os._exit and friends are public
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls") and enclosing.get(node) in extending:
                continue  # a third-party base class's protected member
            offences.append(f"{relative}:{node.lineno}: {expression}")
    assert not offences, "\n".join(offences)


def test_the_worker_side_does_not_import_trio():
    code = (
        "import sys, trio_bridge.worker, trio_bridge.worker._server; "
        "print(sorted(m for m in ('trio', 'trio_bridge._aio') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


MAX_METHODS_PER_HOST_CLASS = 25


def test_no_host_class_has_more_than_25_methods_and_no_two_public_classes_share_a_name():
    """A class of ``_host/`` with more methods does several jobs: split it by job (see
    ``_host_service.py``'s areas). A name is one concept: two public classes of one name (the
    host's and the worker's, say) make users guess which one a page means."""
    crowded = {}
    for path in sorted((PACKAGE / "_host").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                methods = sum(isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) for item in node.body)
                if methods > MAX_METHODS_PER_HOST_CLASS:
                    crowded[f"{path.relative_to(PACKAGE)}: {node.name}"] = methods
    assert not crowded, f"classes with more than {MAX_METHODS_PER_HOST_CLASS} methods: {crowded}"

    import importlib

    by_name: dict[str, set[str]] = {}
    for module_name in ("trio_bridge", "trio_bridge.worker", "trio_bridge.testing"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type):
                for shown in {name, value.__name__}:
                    by_name.setdefault(shown, set()).add(f"{value.__module__}.{value.__qualname__}")
    shared = {name: sorted(classes) for name, classes in by_name.items() if len(classes) > 1}
    assert not shared, f"public classes that share a name: {shared}"
