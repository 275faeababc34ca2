"""The built-in passes (passes/)."""
