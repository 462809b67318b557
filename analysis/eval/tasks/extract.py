"""Answer extraction for generation tasks: a strict and a flexible reading of every output.

The two readings follow lm-evaluation-harness's gsm8k filters ("strict-match" and "flexible-extract");
the same pair is defined for the other filters (see docs/tasks.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from analysis.errors import GraftError

FILTERS = ("numeric", "gsm8k", "boxed", "exact")  # plus "regex:<pattern>"

# lm-eval's gsm8k flexible-extract pattern; we keep only matches with a digit in them.
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")
_GSM8K_STRICT = re.compile(r"#### (-?[$0-9.,]+)|[Tt]he answer is \$?(-?[0-9.,]+)")
_FINAL_ANSWER = re.compile(r"[Tt]he final answer is\s*(.+?)\s*(?:\.\s*I hope|\n|$)")
_DOLLARS = re.compile(r"\$([^$]+)\$")


@dataclass(frozen=True)
class Extraction:
    """Both readings of one output, and whether each matches the gold answer."""

    strict: str | None
    flexible: str | None
    gold: str
    correct_strict: bool
    correct_flexible: bool


def check_filter(name: str, where: str) -> str:
    """Validate a filter name (``where`` names the file for the error)."""
    if name in FILTERS:
        return name
    if name.startswith("regex:"):
        try:
            re.compile(name[len("regex:") :])
        except re.error as err:
            raise GraftError(f"{where}: bad regex in filter {name!r} ({err})", "fix the pattern") from None
        return name
    raise GraftError(
        f"{where}: unknown filter {name!r}", f"use one of {', '.join(FILTERS)} or regex:<pattern>"
    )


def clean_number(text: str) -> str | None:
    """``"$1,000."`` → ``"1000"``; None when no number is left."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def last_number(text: str) -> str | None:
    """The last number in ``text``, cleaned (lm-eval gsm8k flexible-extract)."""
    for match in reversed(_NUMBER.findall(text)):
        number = clean_number(match)
        if number is not None:
            return number
    return None


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        # "\boxed 5": no braces, the token after the space
        rest = text[start + len("\\boxed") :].strip().split()
        return rest[0].rstrip("$.") if rest else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def normalize_math(text: str) -> str:
    """Light LaTeX normalisation: ``\\left( 3, \\dfrac{1}{2} \\right)`` → ``(3,\\frac{1}{2})``."""
    s = text.strip().strip("$").strip()
    s = s.split("=")[-1]  # "x = 5" → "5", as Minerva's normalisation does
    s = re.sub(r"^(.+?)\\text\{\s*[a-zA-Z ]*\}\s*$", r"\1", s)  # trailing units after a value
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\%", ""), ("%", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return clean_number(s) or s


def gold_answer(answer: str, filter_name: str) -> str:
    """The gold string a prediction is compared with: ``... #### 18`` → ``18``; boxed content."""
    text = str(answer).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    elif "\\boxed" in text:
        text = last_boxed(text) or text
    if filter_name == "boxed":
        return normalize_math(text)
    if filter_name in ("numeric", "gsm8k"):
        return clean_number(text) or text
    return text


def _same(pred: str | None, gold: str, filter_name: str) -> bool:
    if pred is None:
        return False
    if filter_name == "boxed":
        return normalize_math(pred) == gold
    a, b = clean_number(pred), clean_number(gold)
    if a is not None and b is not None:
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    if filter_name == "exact":
        return pred == gold
    return pred.strip() == gold.strip()


def _loose(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return " ".join(line.lower().split()).rstrip(".").strip("\"'")


def extract(output: str, answer: str, filter_name: str) -> Extraction:
    """Read ``output`` strictly and flexibly with ``filter_name``, and compare with ``answer``."""
    gold = gold_answer(answer, filter_name)
    strict: str | None
    flexible: str | None
    if filter_name == "numeric":
        strict = clean_number(output)
        flexible = last_number(output)
    elif filter_name == "gsm8k":
        m = _GSM8K_STRICT.search(output)
        strict = clean_number(m.group(1) or m.group(2)) if m else None
        flexible = last_number(output)
    elif filter_name == "boxed":
        strict = last_boxed(output)
        flexible = strict
        if flexible is None:
            fa = _FINAL_ANSWER.findall(output)
            dollars = _DOLLARS.findall(output)
            flexible = fa[-1] if fa else (dollars[-1] if dollars else None)
        strict = normalize_math(strict) if strict is not None else None
        flexible = normalize_math(flexible) if flexible is not None else None
    elif filter_name == "exact":
        strict = output.strip()
        flexible = _loose(output)
        return Extraction(strict, flexible, gold, strict == gold, flexible == _loose(gold))
    else:  # regex:<pattern>
        pattern = re.compile(filter_name[len("regex:") :])
        found = [m.group(1) if m.groups() else m.group(0) for m in pattern.finditer(output)]
        strict = found[0] if found else None
        flexible = found[-1] if found else None
    return Extraction(strict, flexible, gold, _same(strict, gold, filter_name), _same(flexible, gold, filter_name))
