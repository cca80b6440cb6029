"""The bucket as a backup repository: pieces, packs, per-upload indexes, restore.

The format is described in :mod:`akosha_sync.repository.format`. This package sits
below ``sync/`` (``sync`` may import it, it never imports ``sync.cloud`` or server
code) and knows nothing of MCP. Kept free of imports so that importing one module
does not pull in the others.
"""
