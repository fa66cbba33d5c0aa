"""Shared test helpers: real servers on loopback, throwaway PostgreSQL databases."""
