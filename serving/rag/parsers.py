"""Document files to plain text: .txt, .md, .html (stdlib html.parser), .pdf (only where pypdf is installed).

HTML headings become Markdown headings and block elements paragraph breaks, so chunking respects them.
"""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import PurePath

from serving.rag.errors import InvalidInputError, UnsupportedFileTypeError

TEXT_TYPES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown"}
HTML_TYPES = {".html": "html", ".htm": "html"}
PDF_TYPES = {".pdf": "pdf"}
SUPPORTED = sorted({**TEXT_TYPES, **HTML_TYPES, **PDF_TYPES})

_BLOCK = {
    "p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "li", "ul", "ol", "table",
    "tr", "blockquote", "pre", "br", "hr", "dl", "dt", "dd", "figure", "figcaption", "form",
}
_SKIP = {"script", "style", "noscript", "template", "head", "svg"}


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        elif tag == "title":
            self.in_title = True
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "title":
            self.in_title = False
        elif re.fullmatch(r"h[1-6]", tag) or tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    raw = "".join(parser.parts)
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        line = re.sub(r"[ \t\r\f\v\n]+", " ", block).strip()
        if line and line.strip("#").strip():
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def _pdf_to_text(data: bytes, name: str) -> str:
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except Exception as exc:  # pypdf raises many types for broken files
        raise InvalidInputError(f"{name}: not a readable PDF ({exc})", param="files") from None


def file_type(name: str) -> str:
    suffix = PurePath(name).suffix.lower()
    for table in (TEXT_TYPES, HTML_TYPES, PDF_TYPES):
        if suffix in table:
            return table[suffix]
    raise UnsupportedFileTypeError(
        f"{name}: unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED)}",
        param="files",
    )


def parse_bytes(name: str, data: bytes) -> str:
    """The plain text of file `name` (its extension picks the parser)."""
    kind = file_type(name)
    if kind == "pdf":
        return _pdf_to_text(data, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})", param="files") from None
    return html_to_text(text) if kind == "html" else text.replace("\r\n", "\n")


def parse_file(path) -> str:
    from pathlib import Path

    path = Path(path)
    file_type(path.name)  # reject unsupported types before reading
    return parse_bytes(path.name, path.read_bytes())
