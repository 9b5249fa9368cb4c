"""File formats and streaming readers (the only place that touches disk)."""
