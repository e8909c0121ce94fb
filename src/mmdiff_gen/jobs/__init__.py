"""Jobs: loops over prompts that drive generation and writers."""
