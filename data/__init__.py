"""Datasets (DomainBed folders and the built-in demo), view sampling and replay."""
