"""River model factories, snapshots and progressive metrics (imports river only, never Faust)."""
