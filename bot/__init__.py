"""Shoebox's front ends: the command line, the Claude agent and the Discord bot."""
