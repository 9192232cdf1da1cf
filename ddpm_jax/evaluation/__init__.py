"""Metrics, one a module (bits/dim, classifier, FID, Inception, conditional), and the suite."""
