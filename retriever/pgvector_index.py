"""PgVectorIndex: chunk embeddings searched inside PostgreSQL (pgvector, HNSW, inner product), so every
sidecar on one catalog database sees every document the moment it is committed.

The same interface as the faiss `VectorIndex` (build / add / remove / search / needs_rebuild / save),
chosen by `Retriever` when the catalog URL is PostgreSQL and the `vector` extension is installed
(`PgVectorIndex.open` returns None otherwise, and faiss stays the index). Vectors live in
`ragkv_chunk_vectors(id, embedding vector(dim))` keyed by the catalog's chunk ids, with an HNSW index
(`vector_ip_ops`, m / ef_construction / ef_search from RetrieverConfig). `sync` makes the table match
the catalog's embeddings (adds what is missing, drops what the catalog no longer has), so a crash
between the catalog write and the vector write heals on the next open. `save` has nothing to write.
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

from .config import RetrieverConfig

TABLE = "ragkv_chunk_vectors"


def _literal(v: np.ndarray) -> str:
    """pgvector's text form of one vector: `[0.1,0.2,...]`."""
    return "[" + ",".join(f"{x:.8g}" for x in v.tolist()) + "]"


class PgVectorIndex:
    """An HNSW inner-product index over `ragkv_chunk_vectors` in the catalog's PostgreSQL."""

    built_kind = "pgvector-hnsw"
    stale = False  # removals apply in place

    def __init__(self, engine: sa.Engine, dim: int, config: RetrieverConfig | None = None) -> None:
        self.engine = engine
        self.dim = dim
        self.config = config or RetrieverConfig()
        self.generation = -1
        self._create()

    @classmethod
    def open(cls, engine: sa.Engine, dim: int, config: RetrieverConfig | None = None) -> PgVectorIndex | None:
        """The shared index of the catalog at `engine`, or None when it is not PostgreSQL with pgvector."""
        if engine.dialect.name != "postgresql":
            return None
        try:
            with engine.begin() as conn:
                available = conn.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first()
                if available is None:
                    return None
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
        except sa.exc.SQLAlchemyError:
            return None  # no right to create it, or the server went away: faiss it is
        return cls(engine, dim, config)

    # -- the VectorIndex interface ---------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar())

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with `vectors` [N, dim] under `ids` [N]."""
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {TABLE}"))
        self.add(ids, vectors)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert (or replace) `vectors` [N, dim] under `ids` [N]."""
        if len(ids) == 0:
            return
        vectors = np.asarray(vectors, dtype=np.float32)  # [N, dim]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape [N, {self.dim}], got {vectors.shape}")
        rows = [{"id": int(i), "v": _literal(v)} for i, v in zip(ids, vectors)]
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"INSERT INTO {TABLE} (id, embedding) VALUES (:id, CAST(:v AS vector)) "
                    "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding"
                ),
                rows,
            )

    def remove(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {TABLE} WHERE id = ANY(:ids)"), {"ids": [int(i) for i in ids]})

    def needs_rebuild(self) -> bool:
        return False  # HNSW in pgvector takes inserts and deletes in place

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (inner products) and ids [Q, k'] of the best k per query [Q, dim], k' = min(k, N)."""
        queries = np.asarray(queries, dtype=np.float32)  # [Q, dim]
        out_s, out_i = [], []
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"SET LOCAL hnsw.ef_search = {max(int(self.config.hnsw_ef_search), k)}"))
            for q in queries:
                rows = conn.execute(
                    sa.text(
                        f"SELECT id, -(embedding <#> CAST(:q AS vector)) AS score FROM {TABLE} "
                        "ORDER BY embedding <#> CAST(:q AS vector) LIMIT :k"
                    ),
                    {"q": _literal(q), "k": int(k)},
                ).all()
                out_i.append([r[0] for r in rows])
                out_s.append([r[1] for r in rows])
        width = min(len(r) for r in out_i) if out_i else 0
        ids = np.array([r[:width] for r in out_i], dtype=np.int64).reshape(len(queries), width)  # [Q, k']
        scores = np.array([r[:width] for r in out_s], dtype=np.float32).reshape(len(queries), width)  # [Q, k']
        return scores, ids

    def describe(self) -> str:
        return f"pgvector hnsw M={self.config.hnsw_m} efSearch={self.config.hnsw_ef_search} (shared in PostgreSQL)"

    def save(self, path=None) -> None:
        """Nothing to write: every change is committed in PostgreSQL."""

    # -- keeping it equal to the catalog -------------------------------------------------------------------
    def sync(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[int, int]:
        """Make the table hold exactly the catalog's `ids` [N] / `vectors` [N, dim]; (added, removed)."""
        with self.engine.connect() as conn:
            have = set(conn.execute(sa.text(f"SELECT id FROM {TABLE}")).scalars())
        want = {int(i): n for n, i in enumerate(ids)}
        missing = [i for i in want if i not in have]
        extra = np.array(sorted(have - want.keys()), dtype=np.int64)
        if missing:
            self.add(np.array(missing, dtype=np.int64), np.stack([vectors[want[i]] for i in missing]))
        self.remove(extra)
        return len(missing), len(extra)

    def _create(self) -> None:
        c = self.config
        with self.engine.begin() as conn:
            dim = conn.execute(
                sa.text(
                    "SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass(:t) AND attname = 'embedding'"
                ),
                {"t": TABLE},
            ).scalar()
            if dim is not None and int(dim) != self.dim:  # another embedder: the vectors are useless
                conn.execute(sa.text(f"DROP TABLE {TABLE}"))
            conn.execute(
                sa.text(f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT PRIMARY KEY, embedding vector({self.dim}))")
            )
            conn.execute(
                sa.text(
                    f"CREATE INDEX IF NOT EXISTS {TABLE}_hnsw ON {TABLE} USING hnsw (embedding vector_ip_ops) "
                    f"WITH (m = {int(c.hnsw_m)}, ef_construction = {int(c.hnsw_ef_construction)})"
                )
            )
