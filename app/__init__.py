"""MergeForge HTTP edge. It validates and enqueues; it never imports torch."""
