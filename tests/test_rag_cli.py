"""`loraplex ingest` end to end on the shipped handbook corpus, in a temporary data directory."""

import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.cli import main

HANDBOOK = Path(__file__).resolve().parents[1] / "serving" / "rag" / "data" / "handbook"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: OpenMP spinning slows small batches badly
    yield tmp_path
    torch.set_num_threads(threads)


def test_ingest_folder_then_reingest(home, tmp_path, capsys):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for p in HANDBOOK.iterdir():
        (folder / "sub" / p.name).write_bytes(p.read_bytes())
    (folder / "sub" / "image.png").write_bytes(b"\x89PNG")  # skipped inside a folder
    assert main(["ingest", "hb", str(folder), "--create", "--index", "hnsw", "--metadata", '{"team": "hr"}']) == 0
    out = capsys.readouterr()
    assert "5 created" in out.out and "collection now 5 documents" in out.out
    assert "created collection 'hb' (hnsw)" in out.err

    from serving.rag.collections import CollectionService

    svc = CollectionService(home)
    hit = svc.query("hb", "How many vacation days per year?", k=1)["data"][0]
    assert hit["document_id"] == "sub/vacation.md" and hit["metadata"] == {"team": "hr"}
    svc.close()
    # same files and metadata again: unchanged; one changed file: updated
    (folder / "sub" / "offices.txt").write_text("We moved: the headquarters is now in Utrecht.")
    assert main(["ingest", "hb", str(folder), "--metadata", '{"team": "hr"}']) == 0
    assert "(4 unchanged, 1 updated)" in capsys.readouterr().out


def test_ingest_errors(home, tmp_path, capsys):
    assert main(["ingest", "nope", str(HANDBOOK / "offices.txt")]) == 2
    assert "collection 'nope' does not exist; pass --create" in capsys.readouterr().err
    bad = tmp_path / "report.docx"
    bad.write_bytes(b"PK")
    assert main(["ingest", "x", str(bad), "--create"]) == 2
    assert "unsupported file type '.docx'" in capsys.readouterr().err
    assert main(["ingest", "x", str(tmp_path / "missing.md"), "--create"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty.md"
    empty.write_text("   \n")
    assert main(["ingest", "x", str(empty), "--create"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_console_script_lists_ingest():
    out = subprocess.run([sys.executable, "-m", "loraplex.cli", "ingest", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--create" in out.stdout and "--index" in out.stdout
