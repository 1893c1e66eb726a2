"""Session and variable state: pure logic (types, stores) and the backend interface.

Everything here except ``backend.py`` is sans-IO and synchronous, so it is tested directly and
with hypothesis; ``backend.py`` adds the async interface, watching and the session reaper.
"""
