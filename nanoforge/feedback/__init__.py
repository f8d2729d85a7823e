"""The human-preference labelling app (`nanoforge label`): a SQLite store, an aiohttp server with a labelling
page and a stats page, the simulated annotator, and the export to TRL preference pairs."""
