"""The README's tables of every request field of every endpoint, read off the protocol models
(`python -m transerve.http.fields` prints them; a test checks that the README agrees)."""

from __future__ import annotations

from transerve.http.protocol import REQUESTS


def markdown_table() -> str:
    """Every field of every endpoint, with its status and why."""
    lines = []
    for endpoint, model in REQUESTS.items():
        lines += [f"`{endpoint}`", "", "| field | status | notes |", "|---|---|---|"]
        for name, (status, note) in sorted(model.fields().items()):
            lines.append(f"| `{name}` | {status.value} | {note.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
