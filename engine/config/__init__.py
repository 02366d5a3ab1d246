"""Configuration machinery: typed dataclasses <-> command-line flags, shared value checks, repository paths."""
