"""A module the allowlist tests never allow: what of its code runs is recorded in ``RAN``, so a
test can tell that a refusal came before the code, not after."""

from __future__ import annotations

from typing import Any

RAN: list[str] = []


def run(*args: Any) -> tuple[Any, ...]:
    RAN.append("run")
    return args


class Spy:
    """A base class from outside: its property, methods and ``__getattr__`` record that they ran."""

    @property
    def secret(self) -> str:
        RAN.append("Spy.secret")
        return "secret"

    def leak(self) -> str:
        RAN.append("Spy.leak")
        return "leak"

    def __getattr__(self, name: str) -> str:
        RAN.append(f"Spy.__getattr__({name})")
        return name


class Loud:
    """A callable instance's class from outside."""

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        RAN.append("Loud()")
        return args


class Reader:
    """A descriptor from outside: reading the attribute runs its ``__get__``."""

    def __get__(self, obj: object, owner: type | None = None) -> int:
        RAN.append("Reader.__get__")
        return 1
