"""Modeling code that hf-compress copies into the checkpoints it prunes (see `modeling_hf_compress.py`)."""
