"""`loraplex ingest COLLECTION PATH...`: parse, chunk, embed and index files into a collection (local data dir).

Folders are walked recursively for supported files (others in them are skipped); a file named explicitly must
be supported. Document ids are paths relative to the folder given (a file given directly: its name).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("ingest", help="add files to a retrieval collection (.txt .md .html .pdf)",
                              description=__doc__.splitlines()[0])
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files or folders")
    p.add_argument("--create", action="store_true", help="create the collection if it does not exist")
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], default="flat",
                   help="index type for a new collection (default: exact flat search)")
    p.add_argument("--model", default=None, help="embedding model for a new collection (default all-MiniLM-L6-v2)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk for a new collection (200)")
    p.add_argument("--chunk-overlap", type=int, default=None, help="overlap tokens for a new collection (40)")
    p.add_argument("--metadata", default=None, help="JSON object attached to every document")
    p.add_argument("--batch", type=int, default=16, help="files per write transaction (default 16)")
    p.set_defaults(func=_ingest)


def _collect(paths: list[str]) -> list[tuple[str, Path]]:
    from loraplex.cli import CLIError
    from serving.rag.errors import RagError
    from serving.rag.parsers import SUPPORTED, file_type

    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = f.relative_to(path)
                if f.suffix.lower() in SUPPORTED and not any(part.startswith(".") for part in rel.parts):
                    found.append((rel.as_posix(), f))
        elif path.is_file():
            try:
                file_type(path.name)
            except RagError as exc:
                raise CLIError(exc.message) from None
            found.append((path.name, path))
        else:
            raise CLIError(f"{raw}: no such file or folder")
    ids = [doc_id for doc_id, _ in found]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise CLIError(f"two files would get the same document id: {', '.join(dupes[:5])}")
    if not found:
        raise CLIError(f"no supported files ({', '.join(SUPPORTED)}) under {', '.join(paths)}")
    return found


def _ingest(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loraplex.cli import CLIError
    from serving.rag.collections import CollectionService
    from serving.rag.errors import CollectionNotFoundError, RagError

    metadata = None
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except ValueError as exc:
            raise CLIError(f"--metadata is not valid JSON: {exc}") from None
        if not isinstance(metadata, dict):
            raise CLIError("--metadata must be a JSON object")
    if args.batch < 1:
        raise CLIError("--batch must be at least 1")
    files = _collect(args.paths)
    console = Console(stderr=True)
    service = CollectionService()
    try:
        try:
            service.get_collection(args.collection)
        except CollectionNotFoundError:
            if not args.create:
                raise CLIError(f"collection {args.collection!r} does not exist; pass --create to create it") from None
            service.create_collection(args.collection, args.model, args.index, None, args.chunk_tokens,
                                      args.chunk_overlap)
            console.print(f"created collection {args.collection!r} ({args.index})")
        counts: dict[str, int] = {}
        chunks, start = 0, time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[chunks]} chunks"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(f"ingest {args.collection}", total=len(files), chunks=0)
            for i in range(0, len(files), args.batch):
                batch = files[i:i + args.batch]
                docs = [{"id": doc_id, "file": {"name": path.name, "data": path.read_bytes()}, "source": str(path),
                         **({"metadata": metadata} if metadata else {})} for doc_id, path in batch]
                try:
                    result = service.add_documents(args.collection, docs)
                except RagError as exc:
                    raise CLIError(exc.message) from None
                for d in result["data"]:
                    counts[d["status"]] = counts.get(d["status"], 0) + 1
                    chunks += d["chunks"]
                bar.update(task, advance=len(batch), chunks=chunks)
        elapsed = time.perf_counter() - start
        info = service.get_collection(args.collection)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"{args.collection}: {len(files)} files ({summary}); {chunks} new chunks in {elapsed:.1f}s"
              f" ({chunks / max(elapsed, 1e-9):.0f} chunks/s); collection now {info['documents']} documents,"
              f" {info['chunks']} chunks")
    except RagError as exc:
        raise CLIError(exc.message) from None
    finally:
        service.close()
    return 0
