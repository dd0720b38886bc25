"""Guest side: the runtime the VMM sets up, the port protocol, the run loop, built-in guests."""
