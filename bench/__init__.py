"""Benchmarks against the anchors: OpenSSH's sftp-server and bare ffmpeg."""
