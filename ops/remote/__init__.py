"""Remote hosts: inventory, the SSH runner, and the model commands run across a fleet."""
