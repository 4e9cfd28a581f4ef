"""The one backward engine, its rules, and canonical forms of borrowed models."""
