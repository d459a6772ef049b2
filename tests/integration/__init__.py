"""Integration tests: real ``twistd licensing`` processes over mutual TLS on 127.0.0.1."""
