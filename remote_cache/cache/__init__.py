"""Cache semantics over the stores and the archive format.

* :mod:`.image` -- the cache image: an OCI index whose root filesystem is the saved directory;
* :mod:`.save` and :mod:`.restore` -- the two operations, as named phases;
* :mod:`.entries` -- list, inspect, remove, prune, and the restore-key lookup;
* :mod:`.evidence` (the rules) and :mod:`.state` (their storage) -- what this machine knows about
  a directory, so an unchanged tree or layer need not be read again; :mod:`.reuse` applies them;
* :mod:`.spool` -- files one task downloads while another extracts them.
"""
