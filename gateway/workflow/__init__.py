"""Workflow rules: which copies, routes and tags a message gets."""
