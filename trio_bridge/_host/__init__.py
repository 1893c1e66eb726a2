"""The host side (Trio): pool, the worker seam and its workers, dispatch, host service."""
