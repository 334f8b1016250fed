"""Command-line front ends: each parses flags, calls the library (qgraph, passes) and prints."""
