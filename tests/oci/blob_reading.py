"""Reading a whole blob back from a store, both ways a store offers: ``read_blob`` (an async
stream; a registry's fetches the blob whole through ``download_blob``, then hands it out) or
``download_blob`` into a sink (what a restore uses). A test that reads blobs (``read_all``, or
``VIA`` itself) runs both ways under the ``via`` fixture: ``@pytest.mark.usefixtures("via")``."""

from __future__ import annotations

from remote_cache.oci import Descriptor
from remote_cache.oci.store import Store

__all__ = ["READ_WAYS", "read_all"]

READ_WAYS = ("stream", "download")
#: The way of the test running now (set by the ``via`` fixture).
VIA = "stream"


async def read_all(store: Store, desc: Descriptor) -> bytes:
    if VIA == "stream":
        return b"".join([chunk async for chunk in store.read_blob(desc)])
    got = bytearray()
    await store.download_blob(desc, got.extend)
    return bytes(got)
