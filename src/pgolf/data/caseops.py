"""CaseOps (`lossless_caps_caseops_v1`, SPEC-1855 §1.1): a bijective case transform of the text.

Only maximal runs of ASCII letters [A-Za-z] change; everything else passes through. A run w becomes, in
this order of rules:
  1. all lower case                    -> w unchanged;
  2. len >= 2 and all upper case       -> ALLCAPS + lower(w);
  3. upper then lower, len >= 2        -> TITLE + lower(w);
  4. anything else (incl. "I", "A")    -> [TITLE if w[0] is upper] + lower(w[0]) + each later letter
                                          lowered, with CAPNEXT in front of it if it was upper.
The four operator characters found in the input are written as ESC + the character (U+E000 is plain).

The inverse is a left-to-right scan: ESC makes the next character literal (it must be an operator);
TITLE upper-cases the next letter; ALLCAPS upper-cases the run of letters that follows; CAPNEXT, which
only follows a letter, upper-cases the next letter. A marker that is not followed by an ASCII letter
(ESC: by an operator) is dangling or misplaced and raises CaseOpsError. TITLE/ALLCAPS must stand at a word
start (not after an ASCII letter) when `strict`; the tokenizer's decoded text is checked with
strict=False because NFKC can turn the non-ASCII character before a marker into ASCII letters
("™" -> "TM", "ﬁ" -> "fi", fullwidth letters), which the case of the text does not depend on.
"""

from __future__ import annotations

import re

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
OPERATOR_IDS = {TITLE: 4, ALLCAPS: 5, CAPNEXT: 6, ESC: 7}  # reserved SentencePiece ids (SPEC-1855 §1.2)
OP_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}
TRANSFORM_NAME = "lossless_caps_caseops_v1"

_OPERATOR_CHARS = re.compile("[\ue001-\ue004]")
_CASED_RUN = re.compile("[A-Za-z]*[A-Z][A-Za-z]*")  # runs with an upper-case letter (rule 1 is identity)


class CaseOpsError(ValueError):
    """Text is not a valid CaseOps encoding; the message names the marker and its position."""


def _encode_run(match: re.Match) -> str:
    w = match.group(0)
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + w.lower()
    if len(w) >= 2 and w[0].isupper() and w[1:].islower():
        return TITLE + w.lower()
    head = (TITLE if w[0].isupper() else "") + w[0].lower()
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text` (operators in the input escaped, cased ASCII runs rewritten)."""
    if _OPERATOR_CHARS.search(text):
        text = _OPERATOR_CHARS.sub(lambda m: ESC + m.group(0), text)
    return _CASED_RUN.sub(_encode_run, text)


# One alternative per decoder state; the regex engine scans left to right and tries them in this order.
# Group 1: ESC + char; 2: TITLE/CAPNEXT + letter; 3: ALLCAPS + run; 4: anything else starting with a
# marker (dangling or misplaced).
_WORD_START = "(?<![A-Za-z])"
_CAPNEXT_OK = "(?<=[A-Za-z])" + CAPNEXT


def _decoder(strict: bool) -> re.Pattern:
    start = _WORD_START if strict else ""
    return re.compile(
        f"{ESC}(.)|((?:{start}{TITLE}|{_CAPNEXT_OK})[A-Za-z])|({start}{ALLCAPS}[A-Za-z]+)|([\ue001-\ue004])",
        re.DOTALL,
    )


_DECODERS = {True: _decoder(True), False: _decoder(False)}


def _misplaced(text: str, pos: int) -> CaseOpsError:
    op = text[pos]
    after = text[pos + 1 : pos + 2]
    if not after:
        return CaseOpsError(f"CaseOps: dangling {OP_NAMES[op]} at the end of the text (position {pos})")
    if op == ESC:
        return CaseOpsError(f"CaseOps: ESC at position {pos} escapes {after!r}, which is not an operator")
    if op == CAPNEXT and (pos == 0 or not text[pos - 1].isascii() or not text[pos - 1].isalpha()):
        return CaseOpsError(f"CaseOps: CAPNEXT at position {pos} does not follow a letter (misplaced)")
    if not (after.isascii() and after.isalpha()):
        return CaseOpsError(
            f"CaseOps: {OP_NAMES[op]} at position {pos} is followed by {after!r}, not an ASCII letter"
        )
    return CaseOpsError(f"CaseOps: {OP_NAMES[op]} at position {pos} is not at a word start (misplaced)")


def decode(text: str, strict: bool = True) -> str:
    """The inverse of `encode`: decode(encode(x)) == x for every string x; invalid input raises."""
    if not _OPERATOR_CHARS.search(text):
        return text

    def replace(m: re.Match) -> str:
        if m.group(1) is not None:
            if m.group(1) not in OPERATORS:
                raise _misplaced(text, m.start())
            return m.group(1)
        if m.group(2) is not None:
            return m.group(2)[1].upper()
        if m.group(3) is not None:
            return m.group(3)[1:].upper()
        raise _misplaced(text, m.start())

    return _DECODERS[strict].sub(replace, text)
