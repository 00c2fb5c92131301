"""Drafters for speculative decoding and the loop that verifies their guesses.

* :mod:`.mtp`: V4's multi-token-prediction block (``mtp.0`` in the release).
* :mod:`.dspark`: V4-Flash-0731's DSpark block drafter (``mtp.0-2`` in that release), its
  tensor names in :mod:`.dspark_names`.
* :mod:`.speculative`: draft, verify in one target forward, keep the accepted prefix.
"""
