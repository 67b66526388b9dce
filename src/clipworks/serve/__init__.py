"""The search service: an HTTP API and a web page over a `clipworks.search` index."""
