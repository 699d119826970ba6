"""The run loop and its drivers: local (resumable, one process) and Ray (actors), signals, reports."""
