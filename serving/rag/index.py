"""VectorIndex: inner-product search over unit vectors with FAISS, exact (flat) or approximate (IVF, HNSW).

The index owns a dense copy of its vectors (rows sorted by chunk id): exact search, filtered search and ANN
rebuilds all read it. Approximate structures are only built once a collection holds `min_ann` vectors; below
that every search is exact (it is fast there, and IVF cannot be trained on a handful of points).

Persistence is atomic: each save writes a new generation of files (temp name, fsync, os.replace), then swaps
manifest.json, which names the live generation, the same way; a crash at any point leaves the previous
generation readable. On CUDA, exact search runs through kernels.dispatch.topk_scores (our Triton top-k) and
IVF through faiss-gpu where it is installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path

import numpy as np

from serving.rag.errors import InvalidInputError

KINDS = ("flat", "ivf", "hnsw")
FORMAT = 1
DEFAULT_PARAMS = {
    "flat": {},
    # nlist 0 = auto (about 4*sqrt(n), at least 39 training points per list); nprobe tuned by benchmarks/retrieval.py
    "ivf": {"nlist": 0, "nprobe": 32, "min_ann": 4096},
    "hnsw": {"m": 32, "ef_construction": 80, "ef_search": 96, "min_ann": 4096},
}
_REBUILD_DEAD_FRACTION = 0.2  # HNSW cannot delete: tombstones until this fraction, then a rebuild


class IndexCorruptError(RuntimeError):
    """Index files that do not match their manifest (the caller rebuilds from the store)."""


def check_params(kind: str, params: dict | None) -> dict:
    """Validated parameters for `kind`, defaults filled in; errors name the offending key."""
    if kind not in KINDS:
        raise InvalidInputError(f"index must be one of {', '.join(KINDS)}, got {kind!r}", param="index")
    params = dict(params or {})
    unknown = set(params) - set(DEFAULT_PARAMS[kind])
    if unknown:
        raise InvalidInputError(
            f"unknown index_params for {kind}: {', '.join(sorted(unknown))}"
            + (f" (allowed: {', '.join(DEFAULT_PARAMS[kind])})" if DEFAULT_PARAMS[kind] else ""),
            param="index_params",
        )
    out = {**DEFAULT_PARAMS[kind], **params}
    for key, value in out.items():
        low = 0 if key in ("nlist", "min_ann") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low or value > 1 << 20:
            raise InvalidInputError(f"index_params.{key} must be an integer >= {low}, got {value!r}",
                                    param=f"index_params.{key}")
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> str:
    """write(tmp_path) then fsync and rename into place; returns the file's sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        digest = _sha256(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


class VectorIndex:
    """Ids are int64 (chunk ids), vectors float32 unit rows of `dim`. Thread-safe (one lock per index)."""

    def __init__(self, dim: int, kind: str = "flat", params: dict | None = None, device: str = "cpu",
                 exact: str = "auto"):
        """exact: how exact searches run: "faiss" (IndexFlatIP), "kernels" (kernels.dispatch.topk_scores on
        `device`: the Triton kernel on CUDA, its torch reference elsewhere) or "auto" (kernels on CUDA)."""
        import faiss

        if exact not in ("auto", "faiss", "kernels"):
            raise ValueError(f"exact must be auto, faiss or kernels, got {exact!r}")
        self.exact = exact if exact != "auto" else ("kernels" if device.startswith("cuda") else "faiss")
        self._faiss = faiss
        self.dim = int(dim)
        self.kind = kind
        self.params = check_params(kind, params)
        self.device = device
        self.ids = np.zeros(0, dtype=np.int64)
        self.vecs = np.zeros((0, self.dim), dtype=np.float32)
        self._flat = faiss.IndexFlatIP(self.dim)
        self._ann = None  # faiss IndexIVFFlat, or IndexIDMap2 over HNSW, once n >= min_ann
        self._ann_trained_n = 0
        self._dead: set[int] = set()  # HNSW tombstones
        self._gpu_keys = None  # vectors as a torch tensor on `device`, for kernels.topk_scores
        self._ann_gpu = None  # a faiss-gpu copy of the IVF index (faiss-gpu installed and device cuda)
        self._gpu_res = None
        self._lock = threading.RLock()

    # ---- size / content -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def uses_ann(self) -> bool:
        return self._ann is not None

    def _check_vectors(self, vecs, what="vectors") -> np.ndarray:
        vecs = np.asarray(vecs, dtype=np.float32)
        if vecs.ndim == 1:
            vecs = vecs[None, :]
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            got = vecs.shape[-1] if vecs.ndim else 0
            raise InvalidInputError(
                f"embedding dimension mismatch: {what} have {got} dimensions, the index has {self.dim}",
                param="embedding", code="dimension_mismatch",
            )
        if not np.isfinite(vecs).all():
            raise InvalidInputError(f"{what} contain NaN or infinite values", param="embedding")
        return np.ascontiguousarray(vecs)

    def add(self, ids, vecs) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vecs = self._check_vectors(vecs)
        if ids.shape[0] != vecs.shape[0]:
            raise ValueError(f"{ids.shape[0]} ids for {vecs.shape[0]} vectors")
        if ids.size == 0:
            return
        with self._lock:
            if np.isin(ids, self.ids).any() or np.unique(ids).size != ids.size:
                raise ValueError("duplicate ids added to the index")
            order = np.argsort(ids, kind="stable")
            ids, vecs = ids[order], vecs[order]
            if len(self) and ids[0] < self.ids[-1]:  # not appended in id order: merge
                all_ids = np.concatenate([self.ids, ids])
                merged = np.argsort(all_ids, kind="stable")
                self.ids, self.vecs = all_ids[merged], np.concatenate([self.vecs, vecs])[merged]
                self._reset_flat()
            else:
                self.ids = np.concatenate([self.ids, ids])
                self.vecs = np.concatenate([self.vecs, vecs])
                self._flat.add(vecs)
            self._gpu_keys = self._ann_gpu = None
            if self._ann is not None and not self._ann_stale():
                self._ann.add_with_ids(vecs, ids)
            self._maybe_build_ann()

    def remove(self, ids) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            keep = ~np.isin(self.ids, ids)
            removed = int((~keep).sum())
            if not removed:
                return 0
            gone = self.ids[~keep]
            self.ids, self.vecs = self.ids[keep], np.ascontiguousarray(self.vecs[keep])
            self._reset_flat()
            self._gpu_keys = self._ann_gpu = None
            if self._ann is not None:
                if self.kind == "hnsw":
                    self._dead.update(int(i) for i in gone)
                    if len(self._dead) > _REBUILD_DEAD_FRACTION * max(len(self), 1):
                        self._ann = None
                else:
                    self._ann.remove_ids(gone)
            if self._ann is None or len(self) < self.params.get("min_ann", 0):
                self._ann, self._dead = None, set()
            self._maybe_build_ann()
            return removed

    def vectors_for(self, ids) -> np.ndarray:
        rows = self._rows(np.asarray(ids, dtype=np.int64))
        return self.vecs[rows]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self.ids, ids)
        ok = (rows < len(self)) & (self.ids[np.minimum(rows, max(len(self) - 1, 0))] == ids) if len(self) else \
            np.zeros(ids.shape, bool)
        return rows[ok]

    def _reset_flat(self) -> None:
        self._flat = self._faiss.IndexFlatIP(self.dim)
        if len(self):
            self._flat.add(self.vecs)

    # ---- approximate structures -----------------------------------------------------------------------
    def _nlist(self, n: int) -> int:
        want = self.params["nlist"] or int(round(4 * math.sqrt(n)))
        return max(1, min(want, n // 39))

    def _ann_stale(self) -> bool:
        """IVF centroids trained on a quarter of today's vectors or fewer: retrain."""
        return self.kind == "ivf" and len(self) >= 4 * max(self._ann_trained_n, 1)

    def _maybe_build_ann(self) -> None:
        if self.kind == "flat" or len(self) < max(self.params["min_ann"], 1):
            return
        if self._ann is not None and not self._ann_stale():
            return
        self._ann = self._build_ann()

    def _build_ann(self):
        faiss, n = self._faiss, len(self)
        if self.kind == "ivf":
            nlist = self._nlist(n)
            quantizer = faiss.IndexFlatIP(self.dim)
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = self.vecs if n <= 256 * nlist else self.vecs[rng.choice(n, 256 * nlist, replace=False)]
            ivf.train(sample)
            ivf.nprobe = min(self.params["nprobe"], nlist)
            ann = ivf  # IVF stores ids itself (an IDMap over IVF breaks remove_ids)
            self._ann_trained_n = n
        else:
            hnsw = faiss.IndexHNSWFlat(self.dim, self.params["m"], faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.params["ef_construction"]
            hnsw.hnsw.efSearch = self.params["ef_search"]
            ann = faiss.IndexIDMap2(hnsw)
        ann.add_with_ids(self.vecs, self.ids)
        self._dead = set()
        return ann

    def set_search_params(self, **params) -> None:
        """Change nprobe / ef_search at run time (the benchmark sweeps them)."""
        with self._lock:
            self.params = check_params(self.kind, {**self.params, **params})
            if self._ann is not None:
                if self.kind == "ivf":
                    self._ann.nprobe = min(self.params["nprobe"], self._ann.nlist)
                    self._ann_gpu = None
                else:
                    self._faiss.downcast_index(self._ann.index).hnsw.efSearch = self.params["ef_search"]

    # ---- search --------------------------------------------------------------------------------------
    def search(self, queries, k: int, allowed_ids=None, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], ids [q, k]) best first; missing slots have id -1 and score -inf.

        allowed_ids restricts results (a metadata filter): small sets are searched exactly, large ones through
        the index with over-fetching.
        """
        queries = self._check_vectors(queries, "query embeddings")
        if not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}", param="k")
        with self._lock:
            n = len(self)
            scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
            ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
            if n == 0:
                return scores, ids
            if allowed_ids is not None:
                allowed = np.unique(np.asarray(list(allowed_ids), dtype=np.int64))
                if allowed.size == 0:
                    return scores, ids
                if exact or self._ann is None or allowed.size <= max(n // 4, 4 * k):
                    s, i = self._exact_rows(queries, k, self._rows(allowed))
                else:
                    s, i = self._ann_filtered(queries, k, allowed)
            elif exact or self._ann is None:
                s, i = self._exact(queries, k)
            else:
                s, i = self._ann_search(queries, k)
            m = min(k, s.shape[1])
            scores[:, :m], ids[:, :m] = s[:, :m], i[:, :m]
            return scores, ids

    def _exact(self, queries: np.ndarray, k: int):
        k = min(k, len(self))
        if self.exact == "kernels":
            return self._exact_kernels(queries, k)
        s, rows = self._flat.search(queries, k)
        return s, self.ids[rows]

    def _exact_kernels(self, queries: np.ndarray, k: int):
        import torch

        from kernels import dispatch  # imported lazily: only this path needs it (the Triton top-k on CUDA)

        if self._gpu_keys is None:
            self._gpu_keys = torch.from_numpy(self.vecs).to(self.device)
        q = torch.from_numpy(queries).to(self.device)
        s, rows = dispatch.topk_scores(q, self._gpu_keys, k, "ip")
        return s.float().cpu().numpy(), self.ids[rows.cpu().numpy()]

    def _exact_rows(self, queries: np.ndarray, k: int, rows: np.ndarray):
        if rows.size == 0:
            return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
        sub = self.vecs[rows]
        scores = queries @ sub.T
        k = min(k, rows.size)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part = np.take_along_axis(scores, top, 1)
        order = np.argsort(-part, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        return np.take_along_axis(scores, top, 1), self.ids[rows][top]

    def _ann_index(self):
        """The IVF index on the GPU where faiss-gpu (the `gpu` extra) and a CUDA device are there, else on CPU.
        HNSW has no faiss-gpu form and stays on the CPU."""
        faiss = self._faiss
        if self.kind != "ivf" or not self.device.startswith("cuda") or not hasattr(faiss, "StandardGpuResources"):
            return self._ann
        if self._ann_gpu is None:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            gpu = int(self.device.split(":")[1]) if ":" in self.device else 0
            self._ann_gpu = faiss.index_cpu_to_gpu(self._gpu_res, gpu, self._ann)
            self._ann_gpu.nprobe = self._ann.nprobe
        return self._ann_gpu

    def _ann_search(self, queries: np.ndarray, k: int, fetch: int | None = None):
        fetch = min(len(self) + len(self._dead), fetch or (k + len(self._dead)))
        s, i = self._ann_index().search(queries, fetch)
        if self._dead:
            dead = np.isin(i, np.fromiter(self._dead, np.int64, len(self._dead)))
            i = np.where(dead, -1, i)
            s = np.where(dead, -np.inf, s)
            order = np.argsort(-s, axis=1, kind="stable")
            s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        s = np.where(i < 0, -np.inf, s).astype(np.float32)
        return s[:, :k], i[:, :k]

    def _ann_filtered(self, queries: np.ndarray, k: int, allowed: np.ndarray):
        """Over-fetch through the ANN index, keep allowed ids; queries short of k fall back to exact search."""
        fetch = max(4 * k * len(self) // allowed.size, 64)
        s, i = self._ann_search(queries, len(self), fetch)
        ok = np.isin(i, allowed)
        s = np.where(ok, s, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        s, i = np.take_along_axis(s, order, 1), np.where(np.take_along_axis(ok, order, 1),
                                                             np.take_along_axis(i, order, 1), -1)
        short = (i < 0).any(axis=1)
        if short.any():
            es, ei = self._exact_rows(queries[short], k, self._rows(allowed))
            s[short], i[short] = -np.inf, -1
            s[short, : es.shape[1]], i[short, : ei.shape[1]] = es, ei
        return s, i

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, folder, seq: int = 0) -> None:
        """Write a new generation and swap the manifest; then drop older generations' files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            old = self._read_manifest(folder)
            gen = (old or {}).get("generation", 0) + 1
            files, digests = {}, {}
            names = {"ids": f"g{gen:06d}.ids.npy", "vectors": f"g{gen:06d}.vectors.npy"}
            arrays = {"ids": self.ids, "vectors": self.vecs}
            if self._dead:
                names["dead"] = f"g{gen:06d}.dead.npy"
                arrays["dead"] = np.array(sorted(self._dead), dtype=np.int64)
            for key, name in names.items():
                digests[key] = _atomic_write(folder / name, lambda p, a=arrays[key]: _save_npy(p, a))
                files[key] = name
            if self._ann is not None:
                files["ann"] = f"g{gen:06d}.faiss"
                digests["ann"] = _atomic_write(folder / files["ann"],
                                               lambda p: self._faiss.write_index(self._ann, str(p)))
            manifest = {
                "format": FORMAT, "generation": gen, "kind": self.kind, "dim": self.dim, "count": len(self),
                "params": self.params, "seq": int(seq), "ann_trained_n": self._ann_trained_n,
                "files": files, "sha256": digests,
            }
            _fsync_dir(folder)
            _atomic_write(folder / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))
            _fsync_dir(folder)
            live = set(files.values()) | {"manifest.json"}
            for path in folder.iterdir():
                if path.name not in live and path.name.startswith("g") and not path.name.startswith("."):
                    path.unlink(missing_ok=True)

    @staticmethod
    def _read_manifest(folder: Path) -> dict | None:
        try:
            return json.loads((folder / "manifest.json").read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise IndexCorruptError(f"{folder}/manifest.json is not valid JSON: {exc}") from None

    @staticmethod
    def saved_seq(folder) -> int | None:
        """The store sequence number the saved index reflects, or None when nothing is saved."""
        try:
            manifest = VectorIndex._read_manifest(Path(folder))
        except IndexCorruptError:
            return None
        return None if manifest is None else int(manifest.get("seq", -1))

    @classmethod
    def load(cls, folder, device: str = "cpu", exact: str = "auto") -> tuple["VectorIndex", int]:
        """(index, seq) from `folder`; raises FileNotFoundError when nothing is saved, IndexCorruptError on
        files that do not match the manifest."""
        folder = Path(folder)
        manifest = cls._read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"no index saved in {folder}")
        if manifest.get("format") != FORMAT:
            raise IndexCorruptError(f"{folder}: unknown index format {manifest.get('format')!r}")
        files = manifest["files"]
        for key, name in files.items():
            path = folder / name
            if not path.exists() or _sha256(path) != manifest["sha256"][key]:
                raise IndexCorruptError(f"{path} is missing or does not match its checksum")
        index = cls(manifest["dim"], manifest["kind"], manifest["params"], device=device, exact=exact)
        index.ids = np.load(folder / files["ids"])
        index.vecs = np.ascontiguousarray(np.load(folder / files["vectors"]), dtype=np.float32)
        if index.ids.shape[0] != manifest["count"] or index.vecs.shape != (manifest["count"], manifest["dim"]):
            raise IndexCorruptError(f"{folder}: array shapes do not match the manifest")
        index._reset_flat()
        if "ann" in files:
            index._ann = index._faiss.read_index(str(folder / files["ann"]))
            index._ann_trained_n = manifest.get("ann_trained_n", 0)
        if "dead" in files:
            index._dead = {int(i) for i in np.load(folder / files["dead"])}
        return index, int(manifest["seq"])
