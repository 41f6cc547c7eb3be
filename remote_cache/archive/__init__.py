"""The archive format: a directory tree as deterministic layer tars, and back. Knows nothing of OCI.

* :mod:`.tar` -- the tar format both ways (members, headers written, headers decoded);
* :mod:`.walk` and :mod:`.plan` -- walk a tree in archive order and cut it into layers;
* :mod:`.pack` -- compress planned layers (zstd, gzip) in threads, byte-for-byte deterministic;
* :mod:`.decompress` (with :mod:`.frames`), :mod:`.reader`, :mod:`.extract` -- verify and extract
  layers into a staging directory; :mod:`.swap` -- put it in place atomically.
"""
