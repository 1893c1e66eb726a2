"""Adapters that ``trio-bridge run`` uses out of the box."""
