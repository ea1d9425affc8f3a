"""Final-answer extraction and equivalence for math-style verifiable rewards.

The policy is an adversary: it is paid for the one answer it commits to, never for listing
candidates. The committed answer is the content of the last ``\\boxed{...}``, else the number
after the last ``####`` (GSM8K's marker), else the last number in the text. Answers compare as
exact rationals when both sides parse as numbers (``1,234``, ``$18.00``, ``-3/4``,
``\\frac{3}{4}``, ``50%`` vs ``50``), else as whitespace- and case-normalised strings.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"^\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_MARKER = "####"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: no committed answer


def extract_answer(text: str) -> str | None:
    """The answer ``text`` commits to (see the module docstring), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if _MARKER in text:
        tail = text.rsplit(_MARKER, 1)[1]
        found = _NUMBER.search(tail)
        return found.group(0) if found else (tail.strip() or None)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Fraction | None:
    """``text`` as an exact rational, or None when it is not a plain number."""
    s = text.strip().replace(" ", "")
    s = s.removeprefix("$").removesuffix("$").replace("\\$", "").replace("\\%", "%").removesuffix("%")
    s = s.removesuffix(".")
    frac = _FRAC.match(s)
    if frac:
        s = f"{frac.group(1)}/{frac.group(2)}"
    if not re.fullmatch(r"-?\d[\d,]*(?:\.\d+)?(?:/-?\d+(?:\.\d+)?)?|-?\.\d+", s):
        return None
    if "," in s and not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        return None  # "1,2" is a list, not one thousand and two
    try:
        num, _, den = s.replace(",", "").partition("/")
        value = Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def equivalent(answer: str | None, label: str) -> bool:
    if answer is None:
        return False
    a, b = as_number(answer), as_number(label)
    if a is not None and b is not None:
        return a == b
    return " ".join(answer.split()).lower() == " ".join(str(label).split()).lower()
