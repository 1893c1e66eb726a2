"""What both sides of the wire share: generated messages, the value codec, error mapping.

Import-light on purpose: worker processes import this package.
"""
