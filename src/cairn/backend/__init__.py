"""The backend protocol: every client operation. LocalBackend serves an embedded workspace;
a RemoteBackend (HTTP client of the team server) will implement the same protocol."""
