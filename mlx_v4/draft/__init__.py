"""Drafters for speculative decoding and the loop that verifies their guesses.

* :mod:`.mtp`: V4's multi-token-prediction block (``mtp.0`` in the release).
* :mod:`.speculative`: draft, verify in one target forward, keep the accepted prefix.
"""
