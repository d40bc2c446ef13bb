"""Test harnesses shared by the test suites (real servers started on loopback ports)."""
