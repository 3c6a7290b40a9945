"""Strategies shipped with quantcompose, each registered through the
``quantcompose.strategies`` entry point exactly as a third-party plugin is."""
