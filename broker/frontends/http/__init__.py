"""The admin HTTP API and the console (aiohttp): for people and tools, never the data plane."""
