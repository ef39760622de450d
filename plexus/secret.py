"""A wrapper that keeps the API key out of reprs, logs and tracebacks."""

from __future__ import annotations


class Secret:
    """Holds a secret string; only :meth:`reveal` gives it back.

    ``repr()``/``str()`` show ``'***'``, so a secret inside an object, a log
    line or an exception message never leaks the key.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return True

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")
