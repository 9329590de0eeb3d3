"""The model catalog's TOML files; installed as the package data of flashinfer_cli.models."""
