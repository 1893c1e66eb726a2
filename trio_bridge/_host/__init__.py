"""The host side (Trio): pool, worker handles, dispatch, host service."""
