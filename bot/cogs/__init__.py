"""The bot's features, one cog (discord.py extension) each: indexing, asking, administration."""
