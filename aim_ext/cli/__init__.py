"""Command-line entry points: aim-train, aim-eval, aim-demo, aim-export and aim-bench."""
