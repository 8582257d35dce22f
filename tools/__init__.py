"""The tools Shoebox offers to people and to Claude: plain async functions over the image index."""
