"""Thin routers, one per endpoint family: health and metrics, models, completions, chat."""
