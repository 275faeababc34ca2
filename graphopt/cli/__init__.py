"""The command line: click commands and rendering, and the progress display."""
