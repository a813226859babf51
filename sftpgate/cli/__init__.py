"""Thin command-line front: parse, call the library, print."""
