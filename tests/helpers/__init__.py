"""Test doubles and helpers shared by test modules (no services needed)."""
