"""The search page and its JSON API (`sparse-embed serve`): one aiohttp process that holds the
current index and the query encoder, and serves thumbnails of indexed objects only."""
