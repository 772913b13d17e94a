"""The code blocks of a model card's usage section, for the tests that run them as written."""

import re

_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def card_section(text: str, heading: str) -> str:
    """The text under the card's ``### heading`` up to the next heading of level 2 or 3."""
    start = text.index(f"### {heading}\n")
    following = re.search(r"^##+ ", text[start + 4 :], re.M)
    return text[start : start + 4 + following.start()] if following else text[start:]


def card_code_blocks(text: str, heading: str, language: str) -> list[str]:
    """The ``language`` code blocks (python, bash) under ``### heading``, in order."""
    return [code for lang, code in _BLOCK.findall(card_section(text, heading)) if lang == language]
