"""Command-line entry points: aim-train (more to come: aim-eval, aim-export, aim-bench, aim-demo)."""
