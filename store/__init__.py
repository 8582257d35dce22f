"""Shoebox's storage layer: the CLIP embedder, safe image decoding and the image index."""
