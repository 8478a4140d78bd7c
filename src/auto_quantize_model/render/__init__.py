"""Markdown, JSON and plots made from plain records."""
