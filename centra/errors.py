"""One exception type for every user-facing failure: the CLI prints its message as one line."""

from __future__ import annotations

from collections.abc import Callable


class CentraError(Exception):
    """A problem the user can fix (bad file, unknown task, bad input). Printed as one line, exit 2."""


class Name(str):
    """A field's or argument's name inside an error message: whoever prints the message may write it
    another way (the CLI as its flag, a recipe as training.KEY)."""


class FieldError(CentraError):
    """An input of a library function refused by name and value ("precision 'fp16' does not apply to
    engine 'onnx'"). The message names each input by its field name (`Name` parts); `named` writes each
    name another way, as the CLI does with its flags."""

    def __init__(self, *parts: str):
        super().__init__("".join(parts))
        self.parts = parts

    def named(self, name: Callable[[str], str]) -> str:
        return "".join(name(p) if isinstance(p, Name) else p for p in self.parts)
