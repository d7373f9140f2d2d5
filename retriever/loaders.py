"""Reading files into documents: .txt, .md, .html/.htm, .pdf (pypdf) and .jsonl (`text`, optional `id`, `metadata`).

Folders are walked recursively in sorted order. Every problem is a `LoadError` naming the file (and
line) and what is accepted, so one bad file never stops a batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")


@dataclass(frozen=True)
class Document:
    """A text to ingest: its id, text, metadata and where it came from."""

    id: str
    text: str
    metadata: dict = field(default_factory=dict)
    source: str = ""


class LoadError(ValueError):
    """A file (or JSONL line) that cannot be ingested; `path` and `line` say where."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


def find_files(paths: Sequence[str | Path]) -> Iterator[Path | LoadError]:
    """Files under `paths` (folders recursively, sorted); a missing path is a LoadError."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            yield p
        else:
            yield LoadError(str(p), "no such file or folder")


def load_file(path: Path, max_bytes: int) -> Iterator[Document | LoadError]:
    """The documents of one file; errors come out as LoadError items (JSONL: one per bad line)."""
    name, suffix = str(path), path.suffix.lower()
    if suffix not in SUFFIXES:
        yield LoadError(name, f"unknown format {suffix or '(no suffix)'!r}; accepted: {', '.join(SUFFIXES)}")
        return
    size = path.stat().st_size
    if size == 0:
        yield LoadError(name, "empty file")
        return
    if size > max_bytes and suffix != ".jsonl":  # a JSONL file is checked per document
        yield LoadError(name, f"file of {size} bytes is over the limit of {max_bytes} bytes (max_document_bytes)")
        return
    doc_id = str(path.resolve())
    try:
        if suffix == ".jsonl":
            yield from _jsonl(path, max_bytes)
            return
        text = _pdf_text(path) if suffix == ".pdf" else _decode(path)
        if suffix in (".html", ".htm"):
            text = html_to_text(text)
    except LoadError as err:
        yield err
        return
    if not text.strip():
        yield LoadError(name, "no text in file" + (" (a scanned PDF needs OCR first)" if suffix == ".pdf" else ""))
        return
    yield Document(doc_id, text, {"path": doc_id, "format": suffix.lstrip(".")}, doc_id)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise LoadError(str(path), "binary file (NUL bytes); accepted: UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LoadError(str(path), f"not UTF-8 text ({err.reason} at byte {err.start})") from err


def _jsonl(path: Path, max_bytes: int) -> Iterator[Document | LoadError]:
    base = str(path.resolve())
    for n, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        if len(line.encode()) > max_bytes:
            yield LoadError(
                str(path), f"document of {len(line.encode())} bytes is over the limit of {max_bytes} bytes", n
            )
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            yield LoadError(str(path), f"invalid JSON ({err.msg})", n)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            yield LoadError(
                str(path), 'each line must be an object with a non-empty string "text" (optional "id", "metadata")', n
            )
            continue
        meta = obj.get("metadata", {})
        if not isinstance(meta, dict):
            yield LoadError(str(path), '"metadata" must be a JSON object', n)
            continue
        doc_id = str(obj["id"]) if obj.get("id") is not None else f"{base}#{n}"
        yield Document(doc_id, obj["text"], {**meta, "path": base, "line": n}, base)


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, OSError) as err:
        raise LoadError(str(path), f"unreadable PDF ({err})") from err


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "head", "noscript", "template"}
    _BLOCK = {
        "p",
        "div",
        "section",
        "article",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "blockquote",
        "table",
        "ul",
        "ol",
        "header",
        "footer",
        "title",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data) -> None:
        if not self.skip:
            self.parts.append(" ".join(data.split()) if data.strip() else " ")


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, one paragraph per block element."""
    p = _TextExtractor()
    p.feed(html)
    p.close()
    paragraphs = (" ".join(block.split()) for block in "".join(p.parts).split("\n\n"))
    return "\n\n".join(b for b in paragraphs if b)
