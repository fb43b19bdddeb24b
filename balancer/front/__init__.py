"""The fast HTTP/1.1 front end: asyncio Protocols + httptools on the API port."""
