"""How a tcpdump comes to run next to a target: one module per capture mode."""
