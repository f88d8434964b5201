"""The browser demo: a small aiohttp app serving plain HTML/JS pages (the network map today)."""
