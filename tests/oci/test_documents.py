"""The manifests a store keeps by digest stay within their byte budget, oldest out first."""

from __future__ import annotations

from remote_cache.oci import documents
from remote_cache.oci.descriptor import Descriptor
from remote_cache.oci.digest import sha256_digest


def _doc(n: int, size: int) -> tuple[Descriptor, bytes]:
    body = n.to_bytes(4, "big") * (size // 4)
    return Descriptor("application/vnd.oci.image.index.v1+json", sha256_digest(body), len(body)), body


def test_kept_documents_stay_within_the_budget_oldest_out_first() -> None:
    kept = documents.Documents()
    size = documents._BUDGET // 8
    docs = [_doc(n, size) for n in range(12)]
    for desc, body in docs:
        kept.keep(desc, body)
    assert [kept.get(d.digest) is not None for d, _ in docs] == [False] * 4 + [True] * 8
    assert kept.get(docs[-1][0].digest) == docs[-1]
    big_desc, big = _doc(99, documents._BUDGET // 2)
    kept.keep(big_desc, big)  # a document that would crowd out half the rest is not kept
    assert kept.get(big_desc.digest) is None and kept.get(docs[4][0].digest) is not None
