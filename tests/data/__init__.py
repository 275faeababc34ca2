"""Stage 2 (graphopt.data): feeds, data checks and synthesized inputs."""
