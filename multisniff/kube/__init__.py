"""The only package that talks to Kubernetes (kubernetes_asyncio, aiohttp)."""
