"""Starting and watching a fleet's processes: local children or Ray actors, and the fleet manager."""
