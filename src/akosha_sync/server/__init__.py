"""The daemon: MCP server, job queue and session-end route (built on the sync core)."""
